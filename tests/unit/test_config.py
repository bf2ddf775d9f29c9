"""SessionConfig: invalid combinations raise ConfigError with the arithmetic, before any process starts."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dist_backend.config import SessionConfig
from dist_backend.errors import ConfigError
from dist_backend.split import block_bounds, blocks, image_items


def test_ring_on_cuda_gets_an_lse_backend_by_default():
    c = SessionConfig(device="cuda", world_size=2, ring=2, dtype="bfloat16")
    assert c.attention_backend == "_native_cudnn"
    assert SessionConfig(device="cuda", world_size=2, ulysses=2).attention_backend == ""


def test_dp_is_derived_and_round_trips():
    c = SessionConfig(world_size=4, ulysses=2)
    assert c.dp == 2 and c.cp_degree == 2 and c.strategy == "dp2×ulysses2"
    assert SessionConfig.from_json(c.to_json()) == c
    c = SessionConfig(world_size=8, cfg=2, ulysses=2, cache="first_block", cache_threshold=0.2)
    assert c.dp == 2 and c.group_size == 4 and c.strategy == "dp2×cfg2×ulysses2"
    assert SessionConfig.from_json(c.to_json()) == c
    assert SessionConfig.from_json(SessionConfig(compile="regional").to_json()).compile.value == "regional"


@pytest.mark.parametrize("kwargs, words", [
    (dict(world_size=3, ulysses=2), ["world_size (3)", "ring (1) × ulysses (2) = 2"]),
    (dict(world_size=4, dp=3, ulysses=2), ["dp (3) × cfg (1) × ring (1) × ulysses (2) = 6", "world_size is 4"]),
    (dict(world_size=4, cfg=3), ["cfg must be 1 or 2", "got 3"]),
    (dict(world_size=6, cfg=2, ulysses=2), ["world_size (6)", "cfg (2) × ring (1) × ulysses (2) = 4"]),
    (dict(world_size=0), ["world_size must be an integer ≥ 1"]),
    (dict(compile="full"), ["compile='full'", "none, regional"]),
    (dict(cache="teacache"), ["cache='teacache'", "first_block"]),
    (dict(cache_threshold=0.1), ["cache_threshold=0.1 needs a cache"]),
    (dict(cache="taylorseer", cache_threshold=0.1), ["taylorseer", "has no threshold"]),
    (dict(cache="first_block", cache_threshold=-1), ["cache_threshold must be ≥ 0"]),
    (dict(cache="first_block", compile="regional"), ["not supported yet"]),
    (dict(device="tpu"), ["device='tpu'", "cpu, cuda"]),
    (dict(dtype="float8"), ["dtype='float8'"]),
    (dict(dtype="float16"), ["float16", "device='cpu'"]),
    (dict(gpus_per_rank=2), ["gpus_per_rank=2 needs device='cuda'"]),
    (dict(device="cuda", world_size=2, gpus_per_rank=2, ulysses=2), ["context parallelism needs each rank"]),
    (dict(device="cuda", world_size=2, gpu_ids=(0,)),
     ["gpus=0 lists 1 GPUs", "world_size (2) × gpus_per_rank (1) = 2 GPUs", "list 2 GPUs", "set world_size (ranks) to 1"]),
    (dict(device="cuda", world_size=2, gpus_per_rank=2, device_map="balanced", gpu_ids="0,1,2"),
     ["lists 3 GPUs", "world_size (2) × gpus_per_rank (2) = 4", "list 4 GPUs"]),
    (dict(device="cuda", world_size=2, gpu_ids=(1, 1)), ["gpus=1,1 names GPU 1 more than once", "distinct"]),
    (dict(device="cuda", world_size=2, gpu_ids="0,-1"), ["gpus='0,-1'", "'-1' is not a GPU index", "≥ 0"]),
    (dict(device="cuda", world_size=2, gpu_ids="0,x"), ["'x' is not a GPU index", "e.g. '0,1'"]),
    (dict(device="cuda", world_size=1, gpu_ids=(-3,)), ["-3 is not a GPU index"]),
    (dict(gpu_ids="1"), ["gpus=1 picks CUDA devices, but device is 'cpu'", "leave gpus empty"]),
    (dict(max_memory="0=1GB"), ["max_memory is only used with device_map"]),
    (dict(call_timeout_s=0), ["call_timeout_s must be a positive"]),
    (dict(device="cuda", world_size=2, ring=2), ["ring=2 on CUDA", "dtype='bfloat16'"]),
    (dict(device="cuda", world_size=2, ring=2, dtype="bfloat16", attention_backend="native"), ["log-sum-exp"]),
])
def test_invalid_configs_name_the_input(kwargs, words):
    with pytest.raises(ConfigError) as info:
        SessionConfig(**kwargs)
    for word in words:
        assert word in str(info.value)


@given(world=st.integers(-2, 9), dp=st.integers(-1, 9), ring=st.integers(-1, 5), ulysses=st.integers(-1, 5),
       device=st.sampled_from(["cpu", "cuda", "x"]), gpr=st.integers(0, 3), cfg=st.integers(0, 3))
@settings(max_examples=300, deadline=None)
def test_config_either_validates_or_raises_config_error(world, dp, ring, ulysses, device, gpr, cfg):
    try:
        c = SessionConfig(world_size=world, dp=dp, cfg=cfg, ring=ring, ulysses=ulysses, device=device,
                          gpus_per_rank=gpr)
    except ConfigError:
        return
    assert c.dp * c.cfg * c.ring * c.ulysses == c.world_size


@given(n=st.integers(0, 50), k=st.integers(1, 9))
def test_blocks_are_contiguous_and_cover_everything(n, k):
    bounds = blocks(n, k)
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    sizes = [stop - start for start, stop in bounds]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_split_matches_accelerate_split_between_processes():
    # accelerate gives the first n % k processes one extra item, in order: 3 prompts on 2 ranks -> [0, 1], [2]
    assert blocks(3, 2) == [(0, 2), (2, 3)]
    with pytest.raises(ValueError):
        block_bounds(3, 2, 2)


def test_seeds_are_per_image_prompt_major():
    assert image_items(2, 3, 10) == [(0, 10), (0, 11), (0, 12), (1, 13), (1, 14), (1, 15)]


def test_gpus_map_each_rank_to_its_listed_devices_in_order():
    """The `gpus` list is read from text or ints and split over the ranks in rank order, gpus_per_rank each."""
    c = SessionConfig(device="cuda", world_size=2, gpu_ids=" 3, 1 ")
    assert c.gpu_ids == (3, 1) and [c.rank_gpus(r) for r in range(2)] == [(3,), (1,)]
    c = SessionConfig(device="cuda", world_size=2, gpus_per_rank=2, device_map="balanced", gpu_ids=[6, 7, 2, 3])
    assert [c.rank_gpus(r) for r in range(2)] == [(6, 7), (2, 3)]
    assert SessionConfig.from_json(c.to_json()) == c  # what the ranks get
    # Empty: the first world_size × gpus_per_rank devices; CPU: none.
    assert [SessionConfig(device="cuda", world_size=3).rank_gpus(r) for r in range(3)] == [(0,), (1,), (2,)]
    assert SessionConfig(world_size=2, gpu_ids="").rank_gpus(1) == ()


def test_check_devices_names_a_gpu_this_machine_does_not_have():
    import torch

    from dist_backend.config import check_devices

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        with pytest.raises(ConfigError, match="no usable CUDA device"):
            check_devices(SessionConfig(device="cuda", world_size=1, gpu_ids="0"))
        return
    with pytest.raises(ConfigError, match=f"names GPU {count + 5}, but this process sees {count}"):
        check_devices(SessionConfig(device="cuda", world_size=1, gpu_ids=str(count + 5)))
