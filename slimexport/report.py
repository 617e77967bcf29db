"""``report.json`` (for machines: CI gates, servers) and ``report.md`` (for people) of a build folder."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from slimexport.artifacts import write_json, write_text

PARITY_NAMES = {
    "dense_export": "dense engine vs dense PyTorch (export parity)",
    "slim_export": "slim engine vs slim PyTorch (export parity)",
    "slim_vs_dense": "slim vs dense PyTorch (compression fidelity)",
}


def budget_kept(plan: dict) -> dict | None:
    """What the budget is a fraction of, and the fraction kept: ``{"of": "targeted MACs", "kept": 0.730}``.

    Targeted scope: the allocation's own count (its kept cost over the targeted cost, parameters or MACs); whole-UNet
    scope: the UNet's parameters or its MACs at the calibration latents. ``None`` for plans without those fields.
    """
    scope, metric = plan.get("scope", "targeted"), plan.get("metric", "params")
    a, p, m = plan.get("allocation") or {}, plan["params"], plan.get("macs")
    if scope == "unet":
        kept = m["slim"] / m["dense"] if metric == "macs" and m else p["slim_total"] / p["dense_total"] if metric == "params" else None
    else:
        kept = a["kept"] * a["targeted_budget"] / a["target"] if a.get("target") and a.get("kept") is not None else None
    if kept is None:
        return None
    return {"of": f"{'whole-UNet' if scope == 'unet' else 'targeted'} {'MACs' if metric == 'macs' else 'parameters'}",
            "kept": kept}


def make_report(model: str, plan: dict, parity: dict, speed: dict | None, stages: dict, extra: dict | None = None) -> dict:
    p = plan["params"]
    rep = {
        "model": model,
        "budget": plan["budget"],
        "budget_scope": plan.get("scope", "targeted"),
        "targets": plan.get("targets"),
        "allocation": {k: plan.get("allocation", {}).get(k) for k in ("method", "metric")},
        "budget_kept": budget_kept(plan),
        "params": {k: p[k] for k in ("dense_total", "slim_total", "targeted_dense", "targeted_slim")},
        "macs": plan.get("macs"),
        "latency_prediction": (plan.get("allocation") or {}).get("latency"),
        "parity": parity,
        "passed": all(v.get("passed", False) for v in parity.values()),
        "speed": speed,
        "stages": {k: {"seconds": round(v["seconds"], 3), "cached": v["cached"]} for k, v in stages.items()},
    }
    if extra:
        rep.update(extra)
    return rep


def speedup_text(speed: dict, times: str = "×") -> str:
    """``1.164× (95% interval 1.08–1.25)``, saying so when the interval holds 1 (the run cannot tell the two apart)."""
    text = f"{speed['speedup']:.3f}{times}"
    ci = speed.get("speedup_ci95")
    if ci:
        text += f" (95% interval {ci[0]:.3f}–{ci[1]:.3f}"
        text += ": not distinguishable from 1 at this iteration count)" if ci[0] <= 1.0 <= ci[1] else ")"
    elif "speedup_ci95" in speed:  # None: too few iterations for an interval (absent: written before it was measured)
        from slimexport.bench.timing import MIN_CI_ITERATIONS

        text += f" (no interval: fewer than {MIN_CI_ITERATIONS} iterations)"
    return text


def _fmt(v, spec=".3g"):
    if v is None:
        return "–"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def render_markdown(rep: dict) -> str:
    p = rep["params"]
    lines = [f"# slimexport build: {rep['model']} at budget {rep['budget']:g} ({rep['budget_scope']})", ""]
    verdict = "PASSED" if rep["passed"] else "FAILED"
    lines += [f"**Verdict: {verdict}**" + (f"; speed-up {speedup_text(rep['speed'])} (p50 dense / p50 slim)" if rep.get("speed") else ""), ""]
    lines += ["## Parameters", "", "| | dense | slim | kept |", "|---|---:|---:|---:|",
              f"| targeted ({', '.join(rep.get('targets') or [])}) | {p['targeted_dense']:,} | {p['targeted_slim']:,} | {p['targeted_slim'] / p['targeted_dense']:.3f} |",
              f"| whole UNet | {p['dense_total']:,} | {p['slim_total']:,} | {p['slim_total'] / p['dense_total']:.3f} |"]
    if rep.get("macs"):
        m = rep["macs"]
        lines.append(f"| UNet MACs (batch 1, {m['latent'][0]}×{m['latent'][1]} latents) | {m['dense'] / 1e9:.3f} G | {m['slim'] / 1e9:.3f} G | {m['slim'] / m['dense']:.3f} |")
    a = rep.get("allocation") or {}
    if a.get("method"):
        kept = rep.get("budget_kept")
        lines += ["", f"Allocation: `{a['method']}`; the budget counts {a.get('metric') or 'params'}"
                  + (f": {kept['kept']:.3f} of the {kept['of']} kept (budget {rep['budget']:g})." if kept else ".")]
    lines += ["", "## Parity", "",
              "Metrics over all fixed inputs together: max abs `max|a−b|`; max rel `max|a−b|/(|b|+1e-6)`; p99 abs; mean abs; "
              "cosine `a·b/(‖a‖‖b‖)`; SQNR `10·log10(Σb²/Σ(a−b)²)` dB; NaN/Inf always fails.", "",
              "| comparison | max abs | max rel | p99 abs | mean abs | cosine | SQNR dB | verdict |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for key, v in rep["parity"].items():
        verdict = "pass" if v.get("passed") else f"**FAIL**: {v.get('reason')}"
        lines.append(f"| {PARITY_NAMES.get(key, key)} | {_fmt(v.get('max_abs'))} | {_fmt(v.get('max_rel'))} | {_fmt(v.get('p99_abs'))} | "
                     f"{_fmt(v.get('mean_abs'))} | {_fmt(v.get('cosine'), '.6f')} | {_fmt(v.get('sqnr_db'), '.1f')} | {verdict} |")
    svd = rep["parity"].get("slim_vs_dense", {})
    if svd.get("eps_rel_error"):
        lines += ["", "Relative ε-prediction error of the slim model, per timestep: "
                  + ", ".join(f"t={float(t):g}: {_fmt(e, '.4f')}" for t, e in svd["eps_rel_error"].items())
                  + f" (mean {_fmt(svd['eps_rel_error_mean'], '.4f')}, gate ≤ {svd['gate']['max_eps_error']:g}"
                  + (f"; gates: {svd['gate']['basis']}" if svd["gate"].get("basis") else "") + ")."]
        tr = svd.get("trajectory", {})
        if tr:
            lines.append(f"Final latents of a {tr['steps']}-step fixed-seed DDIM trajectory (CFG {tr['guidance_scale']:g}): "
                         f"relative error {_fmt(tr['rel_error'], '.4f')}, cosine {_fmt(tr['cosine'], '.4f')} (gate ≥ {svd['gate']['min_latent_cosine']:g}).")
    s = rep.get("speed")
    if s:
        env = s.get("environment", {})
        threads = s.get("dense_engine", {}).get("threads") or env.get("torch_threads") or "?"
        lines += ["", "## Speed", "",
                  f"Backend `{s['backend']}`{' ' + s['dtype'] if s.get('dtype') else ''} on {s.get('device_name') or s['device']} ({threads} threads), "
                  f"shapes {s.get('shapes', {}).get('sample')}, {s['iterations']} timed iterations per model after "
                  f"{s.get('warmup')} warm-ups, {s.get('mode', '')}.", "",
                  "| | p50 ms | p90 ms | p99 ms |", "|---|---:|---:|---:|",
                  f"| dense | {s['dense_ms']['p50']:.3f} | {s['dense_ms']['p90']:.3f} | {s['dense_ms']['p99']:.3f} |",
                  f"| slim | {s['slim_ms']['p50']:.3f} | {s['slim_ms']['p90']:.3f} | {s['slim_ms']['p99']:.3f} |",
                  "", f"Speed-up (p50 dense / p50 slim): **{speedup_text(s)}**"
                  + (", a paired-bootstrap interval over the timed iterations" if s.get("speedup_ci95") else "")]
        lp = rep.get("latency_prediction")
        if lp and lp.get("predicted_speedup"):
            lines += ["", f"The latency table ({lp.get('backend')}, measured per module and rank) predicted "
                      f"{lp['predicted_ms']:.3f} ms of {lp['dense_ms']:.3f} ms dense: {lp['predicted_speedup']:.3f}× "
                      f"(measured {s['speedup']:.3f}×)."]
    lines += _stepcache_lines(rep.get("stepcache"))
    figs = rep.get("figures") or {}
    if figs:
        lines += ["", "## Figures", ""]
        for name, caption in FIGURE_CAPTIONS.items():
            if name in figs:
                lines += [f"![{caption}]({figs[name]})", "", f"*{caption}*", ""]
    lines += ["", "## Stages", "", "| stage | seconds | cached |", "|---|---:|---|"]
    for k, v in rep["stages"].items():
        lines.append(f"| {k} | {v['seconds']:.2f} | {'yes' if v['cached'] else 'no'} |")
    return "\n".join(lines) + "\n"


def _stepcache_lines(c: dict | None) -> list[str]:
    """The step-caching section: schedule, pair parity, cached-trajectory fidelity, per-image speed-up."""
    if not c or not c.get("check"):
        return []
    chk, per = c["check"], c["check"]["per_image"]
    lines = ["", "## Step caching", "", f"Cache: {c['describe']}; full (F) and shallow (s) steps at {per['steps']} steps: "
             + "; ".join(f"`{n}` {u['schedules'].get(str(per['steps']), '?')}" for n, u in c.get("unets", {}).items()) + ".", "",
             "| pair | graph | max abs | cosine | verdict |", "|---|---|---:|---:|---|"]
    for name, graphs in chk["parity"].items():
        for g, v in graphs.items():
            verdict = "pass" if v.get("passed") else f"**FAIL**: {v.get('reason')}"
            lines.append(f"| {name} | {g} | {_fmt(v.get('max_abs'))} | {_fmt(v.get('cosine'), '.6f')} | {verdict} |")
    lines += ["", f"Whole {per['steps']}-step loops (batch 1, CFG {per['guidance']:g}, every engine call; median of "
              f"{per['rounds']} interleaved rounds), and the final latents against the dense uncached PyTorch UNet "
              f"(gate: cosine ≥ {chk['gate']['min_latent_cosine']:g}, {chk['gate']['basis']}):", "",
              "| variant | s per image | speed-up vs dense | final-latent cosine | final-sample error | verdict |",
              "|---|---:|---:|---:|---:|---|"]
    for name, v in per["variants"].items():
        f = chk["fidelity"].get(name)
        verdict = "" if f is None or not name.startswith("cached") else "pass" if f["passed"] else f"**FAIL**: {f['reason']}"
        lines.append(f"| {name} | {v['median_s']:.3f} | {per['speedup'][name]:.3f}× | "
                     f"{_fmt(f['final_cosine'], '.4f') if f else '1 (reference)'} | {_fmt(f['final_rel_l2'], '.4f') if f else '0'} | {verdict} |")
    return lines


FIGURE_CAPTIONS = {
    "samples": "Images from the same seeds: dense | slim | difference",
    "latents": "Final latents per channel (random weights: images would carry no meaning)",
    "ranks": "Rank kept per module, by block and kind",
    "eps_per_timestep": "Relative ε error of the slim model per timestep",
    "trajectory_cosine": "Latent cosine of dense and slim along a fixed-seed trajectory",
    "latency": "Latency p50/p90/p99, dense and slim engines",
}


def _inline(text: str) -> str:
    """Escape, then the inline markdown this report uses: **bold**, *italic*, `code`."""
    out = html.escape(text)
    out = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", out)
    out = re.sub(r"`(.+?)`", r"<code>\1</code>", out)
    return re.sub(r"(?<![\w*])\*(?!\s)(.+?)\*(?!\w)", r"<em>\1</em>", out)


def render_html(markdown: str, out_dir: str | Path) -> str:
    """A self-contained HTML page of the report's markdown: its figures embedded as data URIs (opens offline)."""
    out_dir = Path(out_dir)
    body: list[str] = []
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            head, rest = rows[0], [r for r in rows[1:] if not all(set(c) <= set("-: ") for c in r)]
            body.append("<table><thead><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr></thead><tbody>"
                        + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in rest)
                        + "</tbody></table>")
            continue
        m = re.fullmatch(r"!\[(.*)\]\((.+)\)", line)
        if m:
            src = out_dir / m.group(2)
            if src.is_file():
                data = base64.b64encode(src.read_bytes()).decode("ascii")
                body.append(f'<figure><img alt="{html.escape(m.group(1))}" src="data:image/png;base64,{data}"></figure>')
        elif line.startswith("## "):
            body.append(f"<h2>{_inline(line[3:])}</h2>")
        elif line.startswith("# "):
            body.append(f"<h1>{_inline(line[2:])}</h1>")
        elif line.strip():
            body.append(f"<p>{_inline(line)}</p>")
        i += 1
    style = ("body{font-family:sans-serif;max-width:62em;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .5em;font-size:.9em}"
             "td{text-align:right}td:first-child{text-align:left}img{max-width:100%}code{background:#f3f3f3}")
    return ("<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>slimexport report</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_report(out_dir: str | Path, rep: dict) -> None:
    """``report.json``, ``report.md`` and a self-contained ``report.html`` (figures embedded) in ``out_dir``."""
    out_dir = Path(out_dir)
    write_json(out_dir / "report.json", rep)
    md = render_markdown(rep)
    write_text(out_dir / "report.md", md)
    write_text(out_dir / "report.html", render_html(md, out_dir))
