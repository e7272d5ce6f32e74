"""Is the audit's verdict the served model's? `make serve-check RUN=runs/demo` (pipeline/method.md, "Audit").

Starts vLLM's OpenAI-compatible server (its CPU build, in its own venv: `make serve-venv`) on a
run's hand-off folder in fp32, listening on a Unix socket in a fresh 0700 folder (no other user
can reach it, and nothing is sent before the socket is known to be the child's), sends every
erased and kept prefix through
`/v1/completions` at temperature 0 with logprobs, and checks each completion against the
greedy continuation the audit scores (the same weights run by transformers): token for
token, each chosen token's logprob within `TOLERANCE`, and the leak span the audit recorded.
Prompts go as token ids and come back as ids, so no tokenizer round trip can hide a
difference; the completion length is fixed (`ignore_eos`), as the audit's is.

    python -m pipeline.serving RUN_DIR --python .venv-serve/bin/python
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from pipeline import audit, metrics, modeling, probes
from pipeline.atomic import open_private
from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.store import RunStore

log = logging.getLogger("icu.serving")
TOLERANCE = 1e-4  # nats: fp32 logprobs of the same weights through two engines' kernels
SERVED_NAME = "handoff"


@dataclass
class Expected:
    """What the audit's greedy probe sees for one row: its continuation, their logprobs, its span."""

    group: str
    row_id: str
    prompt: list[int]
    tokens: list[int]
    logprobs: list[float]
    span: int


@torch.no_grad()
def expected(
    model,
    rows: list[tuple[str, str, list[int]]],
    prefix: int,
    window: int,
    batch_size: int,
    pad_token_id: int,
    settle: int,
) -> list[Expected]:
    """The greedy continuations of the prefix through the first window that the audit's probe
    decodes, whole (`metrics.greedy_continuations`: generate(), not the audit's own decoder), each
    chosen token's logprob from one unpadded forward over prompt + continuation, and the span the
    audit records: that continuation's (`probes.settled` at `settle`), or the longer run the row's own
    text up to a later position gives (`metrics.extractable_span`, teacher forced, not served)."""
    prompts = [r[:prefix] for _, _, r in rows]
    truths = [r[prefix : prefix + window] for _, _, r in rows]
    gens = metrics.greedy_continuations(
        model, prompts, [len(t) for t in truths], batch_size=batch_size, pad_token_id=pad_token_id
    )
    _, _, hits = metrics.nll_and_hits(model, [r for _, _, r in rows], batch_size=batch_size, pad_token_id=pad_token_id)
    out = []
    for (group, rid, row), prompt, gen, truth, row_hits in zip(rows, prompts, gens, truths, hits):
        ids = torch.tensor([prompt + list(gen)], device=model.device)
        logp = torch.log_softmax(model(input_ids=ids).logits[0, len(prompt) - 1 : -1].double(), dim=-1)
        chosen = logp.gather(1, ids[0, len(prompt) :, None]).squeeze(1).tolist()
        span = max(
            probes.longest_span(probes.settled(gen, truth, settle), truth), metrics.extractable_span(row_hits, prefix)
        )
        out.append(Expected(group, rid, prompt, list(gen), chosen, span))
    return out


def served(server: Path, prompt: list[int], length: int) -> tuple[list[int], list[float]]:
    """One greedy completion from the server: (token ids, each one's logprob)."""
    body = dict(
        model=SERVED_NAME,
        prompt=prompt,
        max_tokens=length,
        min_tokens=length,
        temperature=0.0,
        logprobs=1,
        ignore_eos=True,
        return_tokens_as_token_ids=True,
    )
    choice = request(server, "/v1/completions", body)["choices"][0]["logprobs"]
    return [int(t.removeprefix("token_id:")) for t in choice["tokens"]], [float(x) for x in choice["token_logprobs"]]


def compare(want: Expected, got: tuple[list[int], list[float]]) -> dict:
    """One row's verdict: token-exact, the largest logprob gap over the agreeing prefix, the served span."""
    tokens, logprobs = got
    same = next((i for i, (a, b) in enumerate(zip(want.tokens, tokens)) if a != b), min(len(tokens), len(want.tokens)))
    gap = max((abs(a - b) for a, b in zip(want.logprobs[: same + 1], logprobs[: same + 1])), default=0.0)
    return dict(
        group=want.group,
        row_id=want.row_id,
        exact=tokens == want.tokens,
        first_difference=None if tokens == want.tokens else same,
        max_logprob_gap=gap,
        audit_span=want.span,
    )


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a Unix socket: the server listens where only this user can connect."""

    def __init__(self, path: Path, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.socket_path = str(path)

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.socket_path)


def request(server: Path, path: str, body: dict | None = None, timeout: float = 300) -> dict:
    """One call to the server's HTTP API over its socket; the JSON reply (an HTTP error raises)."""
    conn = UnixHTTPConnection(server, timeout)
    try:
        conn.request(
            "POST" if body is not None else "GET",
            path,
            body=None if body is None else json.dumps(body),
            headers={"Content-Type": "application/json"},
        )
        response = conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise ConnectionError(f"HTTP {response.status} from {path}")
        return json.loads(data) if data else {}
    finally:
        conn.close()


def socket_dir() -> Path:
    """A fresh 0700 folder for the server's socket: nobody else can create or reach it."""
    return Path(tempfile.mkdtemp(prefix="icu-serve-"))


def holds(proc: subprocess.Popen, server: Path) -> bool:
    """Whether the process (or one of its children) is the one listening on the socket."""
    import psutil

    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return False
    for member in family:
        try:
            if any(c.laddr == str(server) for c in member.net_connections(kind="unix")):
                return True
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return False


def start(python: str, folder: Path, max_len: int, logfile: Path, server: Path) -> subprocess.Popen:
    """vLLM's API server on the folder, fp32, eager (no graph capture on CPU), listening on the Unix
    socket `server`; waits for /health. Nothing is sent until the socket is known to be the child's;
    on any failure (an interrupt included) the child's whole process group is stopped."""
    cmd = [
        python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(folder),
        "--served-model-name",
        SERVED_NAME,
        "--dtype",
        "float32",
        "--enforce-eager",
        "--uds",
        str(server),
        "--max-model-len",
        str(max_len),
        "--max-logprobs",
        "1",
        "--seed",
        "0",
    ]
    env = dict(
        os.environ,
        VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        HF_HUB_OFFLINE="1",
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
    )
    with open_private(logfile) as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_ready(proc, server, logfile)
    except BaseException:
        stop(proc)
        raise
    return proc


def wait_ready(proc: subprocess.Popen, server: Path, logfile: Path, minutes: float = 15) -> None:
    deadline = time.time() + 60 * minutes
    while True:
        if proc.poll() is not None:
            raise UserError(
                f"serve-check: vLLM exited with code {proc.returncode} before serving: {root_error(logfile)}; "
                f"its log: {logfile}"
            )
        if server.exists():
            if not holds(proc, server):
                raise UserError(
                    f"serve-check: {server} is held by a process that is not the vLLM server this check "
                    "started; refusing to send it any prompt; fix: find who else runs as this user"
                )
            try:
                request(server, "/health", timeout=5)
                return
            except (OSError, ConnectionError, http.client.HTTPException):
                pass
        if time.time() > deadline:
            raise UserError(f"serve-check: vLLM did not come up in {minutes:g} minutes; its log: {logfile}")
        time.sleep(3)


def stop(proc: subprocess.Popen) -> None:
    """The server's whole process group: vLLM starts engine processes of its own, which may
    outlive their leader."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    proc.wait()


def root_error(logfile: Path) -> str:
    """The last exception line of vLLM's log that names a cause (not 'see the stack trace')."""
    errors = [
        line.strip()
        for line in logfile.read_text(errors="replace").splitlines()
        if re.search(r"\w(Error|Exception): ", line) and "stack trace" not in line
    ]
    return errors[-1] if errors else "no exception in its log"


def _dtype(folder: Path) -> str | None:
    config = json.loads((folder / "config.json").read_text())
    return config.get("dtype") or config.get("torch_dtype")


def rows_of(cfg, store: RunStore, tok) -> list[tuple[str, str, list[int]]]:
    """(group, row id, tokens) of the erased requests and the kept rows, as the audit cuts them."""
    return [
        (g.name, rid, row)
        for g in audit.groups_of(cfg, store, tok)
        if g.name in ("erased", "kept")
        for rid, row in zip(g.ids, g.rows)
    ]


def check(run_dir: Path, python: str) -> pd.DataFrame:
    if not (Path(run_dir) / "manifest.json").is_file():
        raise UserError(f"serve-check: {run_dir} is not a run directory; fix: pass runs/<name> (RUN=runs/<name>)")
    store = RunStore(run_dir)
    folder = store.artefact("handoff")
    if store.stage("export").get("status") != "done" or not (folder / "receipt.json").is_file():
        raise UserError(f"serve-check: {folder} is not a finished hand-off; fix: run the pipeline to its export first")
    if not Path(python).is_file():
        raise UserError(f"serve-check: no vLLM venv at {python}; fix: make serve-venv")
    cfg = modeling.resolve(load_config(store.root / "config.yaml"))
    tok = modeling.load_tokenizer(folder)
    model = modeling.load_model(folder, "float32").eval()
    want = expected(
        model,
        rows_of(cfg, store, tok),
        cfg.requests.prefix_tokens,
        cfg.requests.suffix_tokens,
        cfg.audit.batch_size,
        tok.pad_token_id,
        cfg.audit.leak_tokens,
    )
    del model
    started = time.time()
    logs = store.artefact("logs")
    logs.mkdir(parents=True, exist_ok=True)
    logfile = logs / "vllm.log"
    sockets = socket_dir()
    server = sockets / "vllm.sock"
    try:
        proc = start(python, folder, cfg.requests.prefix_tokens + cfg.requests.suffix_tokens + 8, logfile, server)
        try:
            log.info("serve-check: vLLM up in %.0f s", time.time() - started)
            frame = pd.DataFrame([compare(w, served(server, w.prompt, len(w.tokens))) for w in want])
        except (OSError, ConnectionError, http.client.HTTPException) as exc:
            raise UserError(
                f"serve-check: vLLM could not serve {folder} ({type(exc).__name__}: {exc}): "
                f"{root_error(logfile)}; its log: {logfile}"
            ) from None
        finally:
            stop(proc)
    finally:
        shutil.rmtree(sockets, ignore_errors=True)
    recorded = audit.verdicts(store)  # the erased requests' spans per probe, as the receipt has them
    same_weights = _dtype(folder) == _dtype(store.artefact("unlearned_model"))  # else the audit's are not fp32's
    if recorded is not None and "greedy" in recorded and same_weights:
        frame["recorded_span"] = frame["row_id"].map(recorded["greedy"])
    return frame


def passed(frame: pd.DataFrame) -> bool:
    """Every completion token-exact, every logprob within TOLERANCE, every erased request's span
    the one the audit recorded."""
    ok = bool(frame["exact"].all() and frame["max_logprob_gap"].max() <= TOLERANCE)
    if "recorded_span" in frame:
        erased = frame[frame["group"] == "erased"]
        ok = ok and bool((erased["audit_span"] == erased["recorded_span"]).all())
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.serving", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--python", default=".venv-serve/bin/python", help="the vLLM venv's python (make serve-venv)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        frame = check(args.run_dir, args.python)
    except UserError as exc:
        print(f"icu: {exc}", file=sys.stderr)
        return 2
    print(
        frame.groupby("group")
        .agg(rows=("exact", "size"), token_exact=("exact", "sum"), max_logprob_gap=("max_logprob_gap", "max"))
        .to_string()
    )
    ok = passed(frame)
    print(
        f"serve-check: {'PASS' if ok else 'FAIL'}: {int(frame['exact'].sum())}/{len(frame)} completions token-exact, "
        f"max logprob gap {frame['max_logprob_gap'].max():.2e} (tolerance {TOLERANCE:.0e})"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
