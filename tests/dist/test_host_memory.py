"""Host memory of N ranks: each rank reads the components one at a time onto its device, and on the CPU, where the
compute dtype equals the files', the loaded weights *are* the memory-mapped file pages, which the ranks share
(one copy in the page cache, not one per rank). Read from the kernel's own accounting of each rank's mappings
(/proc/<pid>/smaps), not from process totals: with tiny models those are all interpreter and library.
The numbers for a bigger model are bench/host_memory.py's."""

from __future__ import annotations

from pathlib import Path

from dist_backend.config import SessionConfig
from dist_backend.session import Session

COMPONENTS = ["text_encoder", "text_encoder_2", "transformer", "vae"]  # Flux, in stage order
PAGE = 4096


def file_mappings(pid: int, root: Path) -> dict[str, dict[str, int]]:
    """{safetensors file under `root` (relative path): {"Rss", "Pss", "Shared_Clean", ...} in bytes, summed over
    the process's mappings of it}."""
    out: dict[str, dict[str, int]] = {}
    current = None
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5 and ":" not in fields[0]:  # a mapping's header line
            path = fields[5] if len(fields) >= 6 else ""
            current = out.setdefault(str(Path(path).relative_to(root)), {}) \
                if path.endswith(".safetensors") and path.startswith(str(root)) else None
        elif current is not None and len(fields) == 3 and fields[2] == "kB":
            current[fields[0].rstrip(":")] = current.get(fields[0].rstrip(":"), 0) + int(fields[1]) * 1024
    return out


def weight_files(model_dir: Path) -> dict[str, int]:
    """{component: bytes of its safetensors file}."""
    return {c: (model_dir / c / "diffusion_pytorch_model.safetensors").stat().st_size
            if (model_dir / c / "diffusion_pytorch_model.safetensors").is_file()
            else (model_dir / c / "model.safetensors").stat().st_size for c in COMPONENTS}


def run(tiny_dir: Path, *, dtype: str, world_size: int) -> tuple[list[dict], list[dict]]:
    """Load and generate once (every weight read), then each rank's ping and its mappings of the model's files."""
    session = Session(SessionConfig(world_size=world_size, dtype=dtype, threads_per_rank=1))
    try:
        # Two prompts on two data-parallel ranks: each rank encodes, denoises and decodes one, so each reads
        # every weight page.
        session.generate(model_dir=tiny_dir, prompts=["a red fox", "a lighthouse"], seed=1, steps=1, guidance=3.5,
                         height=64, width=64)
        pings = session.sidecar.call("ping", [{}] * world_size)
        maps = [file_mappings(p["pid"], Path(tiny_dir).resolve()) for p in pings]
    finally:
        session.close()
    return pings, maps


def test_two_cpu_ranks_load_component_by_component_and_share_the_mapped_weights(tiny_dirs):
    model_dir = Path(tiny_dirs["flux"]).resolve()
    sizes = weight_files(model_dir)
    pings, maps = run(model_dir, dtype="float32", world_size=2)  # make_tiny saves float32
    for ping, mapped in zip(pings, maps):
        # One at a time, in stage order, each on the rank's device when the next was read.
        assert ping["load_log"] == [[c, "cpu"] for c in COMPONENTS], ping["load_log"]
        for component in COMPONENTS:
            name = next(n for n in mapped if n.startswith(component + "/"))
            print(f"\n[measured] rank {ping['rank']} {name}: file {sizes[component]} B, mapped Rss "
                  f"{mapped[name].get('Rss', 0)} B, shared "
                  f"{mapped[name].get('Shared_Clean', 0) + mapped[name].get('Shared_Dirty', 0)} B, "
                  f"Pss {mapped[name].get('Pss', 0)} B")
        # The transformer's weights are the file's pages (Rss of the mapping: every page but the header's was
        # read; none copied on write: no anonymous page in it), and both ranks map the same pages: shared (clean,
        # or dirty while the just-written file is not yet on disk), each rank's proportional share about half.
        t = mapped[next(n for n in mapped if n.startswith("transformer/"))]
        assert t.get("Rss", 0) >= sizes["transformer"] - 2 * PAGE
        assert t.get("Anonymous", 0) == 0
        assert t.get("Shared_Clean", 0) + t.get("Shared_Dirty", 0) >= sizes["transformer"] - 2 * PAGE
        assert t.get("Pss", 0) <= 0.6 * t["Rss"]


def test_a_converted_dtype_is_private_memory_not_the_mapped_file(tiny_dirs):
    """The same check on weights that must be converted (float32 files, bfloat16 compute): the file is read once and
    let go, so the check above is one that fails when weights are copies."""
    model_dir = Path(tiny_dirs["flux"]).resolve()
    sizes = weight_files(model_dir)
    pings, maps = run(model_dir, dtype="bfloat16", world_size=1)
    assert pings[0]["load_log"] == [[c, "cpu"] for c in COMPONENTS]
    held = maps[0].get(next((n for n in maps[0] if n.startswith("transformer/")), ""), {}).get("Rss", 0)
    print(f"\n[measured] bfloat16 rank: transformer file mapped Rss {held} B of {sizes['transformer']} B")
    assert held < PAGE * 2

