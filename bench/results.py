"""docs/results.md from the latest outputs: the demo's run and every bench's results file.

    python bench/results.py [--demo runs/demo] [--out docs/results.md]

Nothing in docs/results.md is typed by hand: the demo's numbers are read from its run directory
(the report's table, the audit's table, the unlearning's stop and timings), the benches' tables from
the files they wrote (bench/results/*.md). Each part says when and where it was measured.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline import audit  # noqa: E402
from pipeline.atomic import atomic_write_text  # noqa: E402
from pipeline.report import paper_table  # noqa: E402
from pipeline.store import STAGES, RunStore  # noqa: E402


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    flags = Path("/proc/cpuinfo").read_text()
    extra = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    cores = len(flags.split("processor")) - 1
    return f"{cpu}{' (' + ', '.join(extra) + ')' if extra else ' (no AVX512-BF16)'}, {cores} cores"


def committed(path: Path) -> str:
    """When the file was last committed: a bench's table is as old as its run, not as this page."""
    out = subprocess.run(
        ["git", "log", "-1", "--format=committed %cs in %h", "--", str(path)], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    return out or "not committed"


def demo(run: Path) -> list[str]:
    store = RunStore(run)
    manifest = store.manifest()["stages"]
    if manifest.get("export", {}).get("status") != "done":
        return [f"No finished demo run at {run} (`make demo` writes one)."]
    metrics = json.loads(store.artefact("metrics").read_text())
    result = json.loads(store.artefact("unlearn_result").read_text())
    audited = json.loads(store.artefact("audit").read_text())
    seconds = {s: manifest[s].get("seconds", 0.0) for s in STAGES}
    thr = metrics["thresholds"]
    unl = metrics["models"]["unlearned"]
    lines = [
        f"`make demo` run {run} (finished {manifest['export'].get('ended', '?')}): stages "
        + ", ".join(f"{s} {seconds[s]:.0f} s" for s in STAGES)
        + f", {sum(seconds.values()) / 60:.1f} min in all.",
        "",
        paper_table(metrics),
        "",
        f"Thresholds (the original on the never-seen rows): MA {thr['ma']:.3f}, EL10 {thr['el']:.4f}, span "
        f"{thr.get('span', float('nan')):g} tokens. Unlearning: {result['forgotten']}/{result['requests']} "
        f"forgotten after {result['epochs']} epochs ({result['stop_reason']}); the set's LOSS AUC against the "
        f"strangers at each check: {', '.join(f'{a:.3f}' for a in result.get('set_auc', []))}; the neighbours' MA: "
        f"{', '.join(f'{a:.3f}' for a in result.get('neighbour_ma', []))}.",
    ]
    if "privleak" in unl:
        lines += [
            "",
            "PrivLeak against the retrained model: "
            + ", ".join(f"{k} {100 * v:+.1f} %" for k, v in unl["privleak"].items())
            + " (MUSE: within +-5 % passes).",
        ]
    if audited.get("probes"):
        lines += ["", f"The audit ({audited['criterion']}), rows that leak / rows:", "", audit.markdown(audited)]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", default=str(ROOT / "runs" / "demo"))
    parser.add_argument("--out", default=str(ROOT / "docs" / "results.md"))
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    parts = [
        "# Results",
        "",
        f"Written by `bench/results.py` on {time.strftime('%Y-%m-%d')} at commit {commit.strip() or '?'}, on "
        f"{machine()}. Timings compare only within one run of one machine.",
        "",
        "## The demo",
        "",
        *demo(Path(args.demo)),
    ]
    for path in sorted((ROOT / "bench" / "results").glob("*.md")):
        text = path.read_text().strip().splitlines()
        title = text[0].lstrip("# ") if text and text[0].startswith("#") else path.stem
        parts += [
            "",
            f"## {title}",
            "",
            f"From [`bench/results/{path.name}`](../bench/results/{path.name}) ({committed(path)}).",
            "",
            *text[1:],
        ]
    atomic_write_text(Path(args.out), "\n".join(parts).rstrip() + "\n")
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
