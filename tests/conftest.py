import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """get(preset, seed, dtype) -> a tiny checkpoint written once per session and shared by every test
    file that asks for the same one. Tests must not modify it (copy it first)."""
    from hetero.make_model import make_model

    made = {}

    def get(preset: str, seed: int = 3, dtype: str = "bf16"):
        key = (preset, seed, dtype)
        if key not in made:
            out = tmp_path_factory.mktemp(f"{preset}-{seed}-{dtype}")
            made[key] = make_model(preset, out, tiny=True, seed=seed, dtype=dtype, progress=False)
        return made[key]

    return get
