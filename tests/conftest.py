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


@pytest.fixture(scope="session", autouse=True)
def _cpu_kernels_compiled_once(request):
    """With several workers (pytest -n), each first compiles one quantized format of the CPU expert
    kernel (the suite's slowest compiles: ~3 minutes a format on 2 cores) and Numba saves it in its
    on-disk cache, where the other worker, reaching that format later, loads it instead of
    compiling it as well. A worker that gets there first compiles it itself, as without this."""
    worker = getattr(request.config, "workerinput", {}).get("workerid")
    if worker is None:
        return
    import numpy as np

    import cpu_kernels as ck

    fmt = ("int8", "int4")[int(worker.removeprefix("gw")) % 2]
    rng = np.random.default_rng(0)
    E, H, I = 2, 128, 128  # noqa: E741
    w = [rng.standard_normal(s).astype(np.float32) for s in ((E, I, H), (E, I, H), (E, H, I))]
    experts = ck.pack_experts(*w, fmt=fmt)
    x = rng.standard_normal((1, H)).astype(np.float32)
    ck.fused_moe(x, np.zeros((1, 1), np.int32), np.ones((1, 1), np.float32), experts, prefer="decode")


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
