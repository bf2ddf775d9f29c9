"""The host-side LoRA checks (no ranks): every bad file is refused with its name before a call, the wanted set is
normalised the same way on every call, and the CLI's FILE[:STRENGTH] parses as documented."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

from dist_backend.cli import build_parser, parse_lora
from dist_backend.errors import ConfigError
from dist_backend.lora import ADAPTER_PREFIX, lora_specs


@pytest.fixture
def lora(tmp_path):
    path = tmp_path / "style.safetensors"
    save_file({"transformer.proj_out.lora_A.weight": torch.zeros(2, 4),
               "transformer.proj_out.lora_B.weight": torch.zeros(4, 2)}, str(path))
    return path


def test_a_good_file_gets_a_stable_adapter_name(lora, tmp_path):
    (spec,) = lora_specs([(lora, 0.5)])
    assert spec.path == str(lora.resolve()) and spec.strength == 0.5 and spec.name.startswith(ADAPTER_PREFIX)
    assert lora_specs([(str(lora), 0.5)]) == (spec,)  # same file, same name: no reload
    os.utime(lora, ns=(1, 1))  # an edited file (new mtime) is a new adapter, loaded again
    assert lora_specs([(lora, 0.5)])[0].name != spec.name


def test_duplicates_add_up_and_zero_is_dropped(lora, tmp_path):
    other = tmp_path / "other.safetensors"
    other.write_bytes(lora.read_bytes())
    specs = lora_specs([(lora, 0.5), (other, -1.0), (lora, 0.25)])
    assert [(s.path, s.strength) for s in specs] == [(str(lora), 0.75), (str(other), -1.0)]
    assert lora_specs([(lora, 0.5), (lora, -0.5)]) == ()
    assert lora_specs([]) == ()


@pytest.mark.parametrize("case, match", [
    ("missing", "does not exist"),
    ("suffix", "not a .safetensors file"),
    ("truncated", "truncated"),
    ("garbage", "corrupt header"),
    ("checkpoint", "holds no LoRA layers"),
])
def test_bad_files_are_refused_by_name(case, match, lora, tmp_path):
    path = tmp_path / f"{case}.safetensors"
    if case == "suffix":
        path = tmp_path / "style.pt"
        path.write_bytes(lora.read_bytes())
    elif case == "truncated":
        path.write_bytes(lora.read_bytes()[:-8])
    elif case == "garbage":
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    elif case == "checkpoint":
        save_file({"proj_out.weight": torch.zeros(4, 4)}, str(path))
    with pytest.raises(ConfigError, match=match) as info:
        lora_specs([(path, 1.0)])
    assert path.name in str(info.value)


@pytest.mark.parametrize("strength", [float("nan"), float("inf"), "1.0", True, None])
def test_strength_must_be_a_finite_number(strength, lora):
    with pytest.raises(ConfigError, match="strength must be a finite number"):
        lora_specs([(lora, strength)])


def test_cli_lora_argument():
    assert parse_lora("a.safetensors") == ("a.safetensors", 1.0)
    assert parse_lora("a.safetensors:-0.5") == ("a.safetensors", -0.5)
    assert parse_lora("C:/x/a.safetensors") == ("C:/x/a.safetensors", 1.0)  # a colon that is not a strength
    args = build_parser().parse_args(["generate", "--model", "m", "--prompt", "p", "--out", "o",
                                      "--lora", "a.safetensors:0.8", "--lora", "b.safetensors"])
    assert args.lora == [("a.safetensors", 0.8), ("b.safetensors", 1.0)]
