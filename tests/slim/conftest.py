import pytest


@pytest.fixture(scope="session")
def slim_tiny(tiny, tiny_stats):
    from slimexport.allocate.api import plan_ranks
    from slimexport.config import AllocConfig, DecomposeConfig
    from slimexport.decompose.api import slim_unet

    plan = plan_ranks(tiny.unet, tiny_stats, DecomposeConfig(), AllocConfig(budget=0.6))
    return slim_unet(tiny.unet, tiny_stats, plan, DecomposeConfig(), progress=False)[0], plan
