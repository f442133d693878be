import pytest
import torch

# One tiny preset per family variant that the model code distinguishes.
FAMILIES = [
    "deepseek-v2",
    "deepseek-v2-lite",
    "deepseek-v3",
    "qwen2-57b-a14b",
    "qwen3-30b-a3b",
    "mixtral-8x7b",
]


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


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module: tiny models gain nothing from more, and on a shared
    machine they spin against others."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
