"""The ``slimexport`` command: a thin shell over :mod:`slimexport.api`.

Errors a user can cause print one line (``error: ...``) and exit 2 (usage) or 1 (failed verification or run);
``--debug`` shows the traceback.
"""

from __future__ import annotations

import json
import logging
import sys

import click

from slimexport._version import __version__
from slimexport.cli.options import (
    build_config,
    build_options,
    compress_config,
    compress_options,
    dumped_config,
    load_config_file,
)

log = logging.getLogger("slimexport")


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    for noisy in ("diffusers", "transformers", "torch.onnx", "polygraphy"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        from diffusers.utils import logging as dlog

        dlog.set_verbosity_error()
    except ImportError:
        pass


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="slimexport")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.option("-v", "--verbose", count=True, help="More log output.")
@click.option("-q", "--quiet", is_flag=True, help="Warnings and results only; no progress bars.")
@click.pass_context
def cli(ctx, debug, verbose, quiet):
    """Training-free slimming of diffusion UNets (SlimDiff), export, engines, parity and speed in one run."""
    ctx.ensure_object(dict)
    from slimexport.distributed import init_from_env

    dist_device = init_from_env()
    if dist_device is not None:
        ctx.call_on_close(_dist_shutdown)
    ctx.obj.update(debug=debug, progress=not quiet, dist_device=dist_device)
    _setup_logging(verbose, quiet)


def _dist_shutdown():
    from slimexport.distributed import shutdown

    shutdown()


def _with_dist_device(ctx, cfg):
    """Under torchrun, ``--device auto`` means this rank's GPU (or the CPU with gloo)."""
    dev = ctx.obj.get("dist_device")
    return cfg.replace(device=dev) if dev is not None and cfg.device == "auto" else cfg


@cli.command()
@compress_options
@click.option("--out", "-o", type=click.Path(), default=None, help="Output folder. [default: engines/<model>-b<budget>]")
@click.pass_context
def compress(ctx, out, config_file, dump_config, **opts):
    """Calibrate, decompose and allocate: write a slim UNet folder."""
    from slimexport.config import CompressConfig

    base, file_out = load_config_file(config_file, CompressConfig)
    out = out or file_out  # --out on the command line wins over the file's
    cfg = _with_dist_device(ctx, compress_config(base, opts))
    if dump_config:
        click.echo(json.dumps(dumped_config(cfg, out), indent=2))
        return
    from slimexport import api

    res = api.compress(cfg, out=out, progress=ctx.obj["progress"])
    if res is None:  # a torchrun rank other than 0: its share of the statistics went into rank 0's result
        return
    from slimexport.report import budget_kept

    p, kept = res.plan["params"], budget_kept(res.plan)
    click.echo(f"slim UNet: {res.slim_dir}")
    if kept:
        click.echo(f"budget {cfg.alloc.budget:g} of the {kept['of']}: {kept['kept']:.3f} kept")
    click.echo(f"targeted parameters: {p['targeted_dense']:,} -> {p['targeted_slim']:,} ({p['targeted_slim'] / p['targeted_dense']:.3f})")
    click.echo(f"UNet parameters:     {p['dense_total']:,} -> {p['slim_total']:,} ({p['slim_total'] / p['dense_total']:.3f})")
    if "macs" in res.plan:
        m = res.plan["macs"]
        click.echo(f"UNet MACs (batch 1, {m['latent'][0]}x{m['latent'][1]} latents): {m['dense'] / 1e9:.3f} G -> "
                   f"{m['slim'] / 1e9:.3f} G ({m['slim'] / m['dense']:.3f})")


def _detail(v: dict) -> str:
    """One comparison's line: its failure reason, else the metrics its gate reads."""
    if v.get("reason"):
        return v["reason"]
    if "problems" in v:  # the integrity check, passed
        return "every recorded artifact matches its sha256"
    gate, traj = v.get("gate") or {}, v.get("trajectory") or {}
    if "max_eps_error" in gate and isinstance(v.get("eps_rel_error_mean"), float):  # slim vs dense: quality gates
        text = f"mean eps error {v['eps_rel_error_mean']:.4f} (gate <= {gate['max_eps_error']:g})"
        if isinstance(traj.get("cosine"), float):
            text += f", final-latent cosine {traj['cosine']:.4f} (gate >= {gate['min_latent_cosine']:g})"
        return text
    return ", ".join(f"{m} {v[m]:{f}}" for m, f in (("max_abs", ".3g"), ("cosine", ".6f")) if isinstance(v.get(m), float))


def _print_verdict(rep: dict) -> None:
    for key, v in rep["parity"].items():
        click.echo(f"  {'pass' if v.get('passed') else 'FAIL'}  {key:14s} {_detail(v)}")
    check = (rep.get("stepcache") or {}).get("check")
    for name, f in (check or {}).get("fidelity", {}).items():
        if name.startswith("cached"):
            click.echo(f"  {'pass' if f['passed'] else 'FAIL'}  {name:14s} final-latent cosine {f['final_cosine']:.4f} "
                       f"(gate >= {f['gate']['min_latent_cosine']:g}) vs dense uncached")
    if rep["parity"]:
        click.echo(f"verdict: {'PASSED' if rep.get('passed') else 'FAILED'}")
    s = rep.get("speed")
    if s:
        from slimexport.report import speedup_text

        click.echo(f"speed ({s['backend']}{' ' + s['dtype'] if s.get('dtype') else ''}, {s.get('device_name') or s['device']}, "
                   f"{s['iterations']} iterations): dense p50 "
                   f"{s['dense_ms']['p50']:.3f} ms, slim p50 {s['slim_ms']['p50']:.3f} ms, speed-up {speedup_text(s, 'x')}")
    if check:
        per = check["per_image"]
        click.echo(f"per image ({per['steps']} steps, CFG, {rep['stepcache']['describe']}): "
                   + ", ".join(f"{k} {v:.2f}x" for k, v in per["speedup"].items() if k != "dense") + " vs dense")


def _verdict_exit(res) -> None:
    from slimexport.errors import VerificationError

    if not res.passed:
        failed = [f"{k} ({', '.join(v.get('failed') or ['failed'])})" for k, v in res.report["parity"].items() if not v.get("passed")]
        check = (res.report.get("stepcache") or {}).get("check") or {}
        failed += [f"step cache {n} {g} parity" for n, gs in check.get("parity", {}).items() for g, v in gs.items() if not v["passed"]]
        failed += [f"{n} ({f['reason']})" for n, f in check.get("fidelity", {}).items() if n.startswith("cached") and not f["passed"]]
        md = res.out_dir / "report.md"
        raise VerificationError(f"verification failed: {'; '.join(failed)}",
                                f"see {md}" if md.exists() else "rebuild the folder with slimexport build (its report is gone)")


@cli.command()
@build_options
@click.option("--out", "-o", type=click.Path(), default=None, help="Output folder. [default: engines/<model>-b<budget>-<backend>]")
@click.pass_context
def build(ctx, out, config_file, dump_config, speedup, **opts):
    """Compress, export to ONNX, build engines, verify parity and measure the speed-up, in one run."""
    from slimexport.config import BuildConfig

    base, file_out = load_config_file(config_file, BuildConfig)
    out = out or file_out  # --out on the command line wins over the file's
    cfg = build_config(base, opts)
    cfg = cfg.replace(compress=_with_dist_device(ctx, cfg.compress))
    if dump_config:
        click.echo(json.dumps(dumped_config(cfg, out), indent=2))
        return
    from slimexport import api

    res = api.build(cfg, out=out, progress=ctx.obj["progress"], speedup=speedup)
    if res is None:
        return
    rep = res.report
    st = rep.get("speed_target")
    if st:
        click.echo(f"speed target {st['target']:g}x: budget {st['chosen_budget']:g} chosen after "
                   + ", ".join(f"{t['budget']:g} -> {t['speedup']:.3f}x" if "speedup" in t else f"{t['budget']:g} refused"
                               for t in st["trials"])
                   + (f"; the folder re-timed: {st['final']['speedup']:.3f}x" if st.get("final", {}).get("speedup") else ""))
    p = rep["params"]
    click.echo(f"build folder: {res.out_dir}  (report: {res.out_dir / 'report.md'})")
    click.echo(f"parameters: targeted {p['targeted_dense']:,} -> {p['targeted_slim']:,}, UNet {p['dense_total']:,} -> {p['slim_total']:,}")
    _print_verdict(rep)
    _verdict_exit(res)


@cli.command()
@click.argument("folder", type=click.Path())
def verify(folder):
    """Check a build folder's artifacts and rerun its parity comparisons (exit 1 on failure)."""
    from slimexport import api

    res = api.verify_folder(folder)
    _print_verdict({**res.report, "speed": None})
    _verdict_exit(res)


@cli.command()
@click.argument("folder", type=click.Path())
@click.option("--iterations", type=int, default=None, help="Timed iterations per model. [default: the build's]")
def bench(folder, iterations):
    """Time a build folder's dense and slim engines again, in one process."""
    from slimexport import api

    res = api.bench_folder(folder, iterations=iterations)
    _print_verdict({"parity": {}, "speed": res.report["speed"]})


def _build_options_except(*names: str):
    """``build``'s options less ``names`` (those a sweep sets per point, or does not run), for ``sweep``."""
    from slimexport.cli.options import build_options

    probe = build_options(lambda: None)
    kept = [p for p in probe.__click_params__ if p.name not in names]

    def wrap(f):
        f.__click_params__ = [*getattr(f, "__click_params__", []), *kept]
        return f

    return wrap


@cli.command()
@_build_options_except("budget", "targets", "allocation", "speedup", "config_file", "pipeline", "figures")
@click.option("--budgets", required=True, help="Budgets, comma-separated, each in (0, 1] (of --budget-metric, --budget-scope), "
                                               "e.g. 0.9,0.8,0.73,0.6.")
@click.option("--targets", "target_sets", multiple=True, help="A target set, e.g. attn,ffn; repeat for more "
                                                             "(--targets attn,ffn --targets attn,ffn,resnet). [default: the build's]")
@click.option("--allocations", default=None, help="Allocations, comma-separated, of softmax,uniform,greedy. [default: the build's]")
@click.option("--judge-samples", type=int, default=None,
              help="digits: generated samples per point scored by the judge (accuracy, Fréchet distance); 0: off. [default: 200 on digits]")
@click.option("--out", "-o", type=click.Path(), required=True, help="Sweep folder: points/<id>/, frontier.json, frontier.md, frontier.png.")
@click.pass_context
def sweep(ctx, out, dump_config, budgets, target_sets, allocations, judge_samples, **opts):
    """The speed-quality frontier: one calibration, one dense export and engine, then every budget x targets x allocation
    point built, verified and timed; writes frontier.json, frontier.md and frontier.png."""
    from slimexport.cli.options import build_config
    from slimexport.config import BuildConfig
    from slimexport.sweep import SweepConfig, parse_allocations, parse_budgets, parse_target_sets

    base = build_config(BuildConfig(), opts)
    cfg = SweepConfig(build=base, budgets=parse_budgets(budgets), judge_samples=judge_samples,
                      allocations=parse_allocations(allocations) if allocations is not None else None,
                      targets=parse_target_sets(target_sets) if target_sets else None)
    if dump_config:
        click.echo(json.dumps(cfg.to_dict(), indent=2))
        return
    from slimexport.sweep import sweep as run_sweep

    res = run_sweep(cfg, out=out, progress=ctx.obj["progress"], command=" ".join(["slimexport", *ctx.obj.get("argv", sys.argv[1:])]))
    fr = res.frontier
    click.echo(f"sweep folder: {res.out_dir}  (frontier: {res.out_dir / 'frontier.md'})")
    click.echo(f"{len(fr['points'])} points ({sum(res.reused.values())} reused), Pareto-optimal: {', '.join(fr['pareto'])}")
    if fr.get("cache"):
        click.echo(f"step caching ({fr['cache']['describe']}), per image at {fr['cache']['steps']} steps, Pareto-optimal: "
                   + ", ".join(f"{i} {next(x['speedup'] for x in fr['cache']['rows'] if x['id'] == i):.3f}×" for i in fr["cache"]["pareto"]))


@cli.command("models")
def models_cmd():
    """List the model registry."""
    from slimexport.models.registry import REGISTRY

    for name, spec in sorted(REGISTRY.items()):
        click.echo(f"{name:10s} {spec.hub_id or '(built in)':45s} {spec.description}")


def _with_flag(err) -> str:
    """The error's line in the CLI's words: a rejected config field names its flag (``AllocConfig.budget`` is
    ``--budget``); a setting error's ``Class.field=value`` reads ``--flag value``."""
    from slimexport.cli.options import CONFIG_FLAGS, as_flags
    from slimexport.errors import ConfigError, SettingError

    if isinstance(err, SettingError):
        return as_flags(str(err))
    flag = CONFIG_FLAGS.get((err.cls, err.field)) if isinstance(err, ConfigError) else None
    return f"{err.message} (flag {flag}); {err.fix}" if flag else str(err)


def main(argv=None) -> int:
    """Entry point: runs the click group and turns :class:`SlimExportError` into one line and an exit code."""
    from slimexport.errors import SlimExportError

    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        cli.main(args=args, prog_name="slimexport", standalone_mode=False, obj={"argv": args})  # argv: what sweep records
    except SlimExportError as err:
        if debug:
            raise
        click.echo(f"error: {_with_flag(err)}", err=True)
        return err.exit_code
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except KeyboardInterrupt:
        click.echo("interrupted: completed stages are kept; rerun the same command to resume", err=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
