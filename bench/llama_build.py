#!/usr/bin/env python3
"""Build llama.cpp's `llama-server` for bench/real_runtime.py, once, into a cache.

The only source is the llama.cpp tree vendored in the `llama-cpp-python` sdist from PyPI (pinned below):
`pip download --no-binary :all: --no-deps llama-cpp-python==VERSION`, then its `vendor/llama.cpp` is
extracted. No git clone, no other download: the web UI is neither built nor fetched
(`LLAMA_BUILD_UI=OFF`, `LLAMA_USE_PREBUILT_UI=OFF`; the server then runs without its embedded UI), no
OpenSSL/curl, no tests, no examples. Only the `llama-server` target is built, statically linked, with
`GGML_NATIVE=ON` (the binary is for this machine), `-j2`: ~11 minutes on 2 cores, once.

Cache layout, `~/.cache/splitstream/llama.cpp/<version>/` (or `$SPLITSTREAM_CACHE/llama.cpp/<version>/`):

    sdist/llama_cpp_python-<version>.tar.gz   the download
    src/                                       vendor/llama.cpp from it
    build/bin/llama-server                     the binary (its presence means "built": delete build/ to rebuild)
    build.log, build-info.json                 cmake output; options, seconds, when
    models/<name>-e<embd>-l<layers>-<hash>.gguf   the bench's random-weight models (`ensure_models`)

The models are llama-architecture GGUF files written with gguf-py's GGUFWriter (`pip install gguf numpy`):
random F16 matrices, a byte-level BPE vocabulary over printable ASCII only (plus merges learned on the
pseudo-words prompts are made of, and chatml control tokens) and a chatml chat template, so llama.cpp loads
them without any download and every sampled token decodes to valid text. A spec change changes the hash.

cmake and g++ are installed with apt-get when missing and this runs as root; otherwise it says what is missing.

    .venv/bin/python bench/llama_build.py          # build and write the models (or say where they are)
    .venv/bin/python bench/llama_build.py --print  # just the binary path, building if needed
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# llama-cpp-python release whose vendored llama.cpp is built (0.3.36 vendors llama.cpp 0.5.0-dev, 2026-10).
LLAMA_CPP_PYTHON_VERSION = "0.3.36"

CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DGGML_NATIVE=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",     # the server lives under tools/; only its target is built
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_UI=OFF",       # no npm
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # no download of the UI at build time
    "-DLLAMA_OPENSSL=OFF",
)


def cache_dir(version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    base = os.environ.get("SPLITSTREAM_CACHE")
    root = Path(base) if base else Path.home() / ".cache" / "splitstream"
    return root / "llama.cpp" / version


def server_binary(version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    return cache_dir(version) / "build" / "bin" / "llama-server"


def _say(msg: str) -> None:
    print(f"[llama_build] {msg}", flush=True)


def _ensure_tools() -> None:
    missing = [t for t in ("cmake", "g++") if shutil.which(t) is None]
    if not missing:
        return
    if os.geteuid() != 0:
        raise SystemExit(f"[llama_build] missing {', '.join(missing)}: install them (apt-get install -y cmake g++)")
    _say(f"installing {' '.join(missing)} with apt-get")
    subprocess.run(["apt-get", "update"], check=True)
    subprocess.run(["apt-get", "install", "-y", "cmake", "g++"], check=True)


def _pip() -> list[str]:
    """pip of this interpreter, else the first `pip` on the PATH."""
    probe = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True)
    if probe.returncode == 0:
        return [sys.executable, "-m", "pip"]
    pip = shutil.which("pip3") or shutil.which("pip")
    if not pip:
        raise SystemExit("[llama_build] no pip to download the llama-cpp-python sdist with")
    return [pip]


def ensure_source(version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    """src/ (vendor/llama.cpp of the sdist), downloading and extracting it when missing."""
    root = cache_dir(version)
    src = root / "src"
    if (src / "CMakeLists.txt").exists() and (src / "tools" / "server").is_dir():
        return src
    sdist_dir = root / "sdist"
    sdist_dir.mkdir(parents=True, exist_ok=True)
    tarball = sdist_dir / f"llama_cpp_python-{version}.tar.gz"
    if not tarball.exists():
        _say(f"downloading the llama-cpp-python {version} sdist (~75 MB) into {sdist_dir}")
        subprocess.run([*_pip(), "download", "--no-binary", ":all:", "--no-deps", "--no-input",
                        f"llama-cpp-python=={version}", "-d", str(sdist_dir)], check=True)
        if not tarball.exists():
            found = sorted(sdist_dir.glob("llama_cpp_python-*.tar.gz"))
            if not found:
                raise SystemExit(f"[llama_build] pip downloaded no sdist into {sdist_dir}")
            tarball = found[-1]
    _say(f"extracting vendor/llama.cpp from {tarball.name}")
    prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    tmp = root / "src.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tarfile.open(tarball) as tf:
        members = []
        for m in tf.getmembers():
            if m.name.startswith(prefix) and len(m.name) > len(prefix):
                m.name = m.name[len(prefix):]
                members.append(m)
        if not members:
            raise SystemExit(f"[llama_build] {tarball} has no {prefix}")
        tf.extractall(tmp, members=members, filter="data")
    shutil.rmtree(src, ignore_errors=True)
    tmp.rename(src)
    return src


def build(version: str = LLAMA_CPP_PYTHON_VERSION, jobs: int = 2, quiet: bool = False) -> Path:
    """The llama-server binary, built when not cached. Raises SystemExit when the build fails."""
    binary = server_binary(version)
    if binary.exists():
        if not quiet:
            _say(f"cached: {binary}")
        return binary
    _ensure_tools()
    src = ensure_source(version)
    root = cache_dir(version)
    bdir = root / "build"
    log = root / "build.log"
    _say(f"building llama-server from llama-cpp-python {version}'s llama.cpp, -j{jobs} "
         f"(~11 min on 2 cores; log {log})")
    t0 = time.monotonic()
    with log.open("w") as out:
        for cmd in (["cmake", "-S", str(src), "-B", str(bdir), *CMAKE_OPTIONS],
                    ["cmake", "--build", str(bdir), "--target", "llama-server", f"-j{jobs}"]):
            out.write("$ " + " ".join(cmd) + "\n")
            out.flush()
            rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
            if rc != 0:
                tail = log.read_text(errors="replace").splitlines()[-30:]
                raise SystemExit(f"[llama_build] `{' '.join(cmd[:3])} ...` failed ({rc}); last lines of {log}:\n"
                                 + "\n".join(tail))
    seconds = time.monotonic() - t0
    if not binary.exists():
        raise SystemExit(f"[llama_build] the build finished but {binary} is missing (see {log})")
    (root / "build-info.json").write_text(json.dumps({
        "llama_cpp_python": version, "options": list(CMAKE_OPTIONS), "jobs": jobs,
        "build_seconds": round(seconds, 1), "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }, indent=2) + "\n")
    _say(f"built {binary} in {seconds:.0f} s")
    return binary


def build_info(version: str = LLAMA_CPP_PYTHON_VERSION) -> dict[str, Any]:
    """What build-info.json says about the cached build (just the version when it was not built here)."""
    try:
        info: dict[str, Any] = json.loads((cache_dir(version) / "build-info.json").read_text())
        return info
    except (OSError, ValueError):
        return {"llama_cpp_python": version}


# ---------------------------------------------------------------------------------------------------
# random-weight models


@dataclass(frozen=True)
class ModelSpec:
    """A llama-architecture model with random weights (F16 matrices, F32 norms) and a tiny ASCII BPE vocab."""

    name: str
    n_embd: int
    n_layer: int
    n_ff: int
    n_head: int
    n_head_kv: int
    n_ctx: int = 8192
    n_merges: int = 400
    seed: int = 1

    def tag(self) -> str:
        """File name stem: changes whenever anything that shapes the file does."""
        h = hashlib.sha256(repr((self, MODEL_FORMAT)).encode()).hexdigest()[:8]
        return f"{self.name}-e{self.n_embd}-l{self.n_layer}-{h}"

    def params(self, n_vocab: int) -> int:
        head_dim = self.n_embd // self.n_head
        per_layer = (2 * self.n_embd * self.n_embd + 2 * self.n_embd * head_dim * self.n_head_kv
                     + 3 * self.n_embd * self.n_ff + 2 * self.n_embd)
        return self.n_layer * per_layer + 2 * n_vocab * self.n_embd + self.n_embd


MODEL_FORMAT = 1  # bump when the writer below changes what it writes
# Sized so that on one thread the big model is ~3-4x slower per token than the small one (prefill and decode;
# measured on the 2-core development machine: ~11 M and ~35 M parameters). Small on purpose: the whole pair's
# capacity is a few requests per second on 2 cores, and a run needs a few hundred requests.
MODELS = (
    ModelSpec("fast", n_embd=384, n_layer=6, n_ff=1024, n_head=6, n_head_kv=6),
    ModelSpec("slow", n_embd=512, n_layer=10, n_ff=1536, n_head=8, n_head_kv=8),
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# A chatml template (jinja): the server formats /v1/chat/completions with it; only ASCII in and out.
CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
                 "+ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                 "{% endif %}")
SYLLABLES = ("ba", "ko", "ri", "te", "mu", "sa", "lo", "ne", "di", "pa", "ve", "zu", "ga", "mi", "to", "ra",
             "fe", "lu", "no", "ki", "the", "and", "ing", "er", "on", "st", "qu", "ch", "sh", "or")


def _byte_char(b: int) -> str:
    """GPT-2's byte-to-unicode map, for the bytes this vocab has: printable ASCII as is, space Ġ, newline Ċ."""
    if 0x21 <= b <= 0x7E:
        return chr(b)
    return {0x20: "\u0120", 0x0A: "\u010a"}[b]


def words(rng: random.Random, n: int) -> list[str]:
    """n pseudo-words of 1-3 syllables: what prompts are made of (and what the merges are learned on)."""
    return ["".join(rng.choice(SYLLABLES) for _ in range(rng.choice((1, 2, 2, 3)))) for _ in range(n)]


@functools.lru_cache(maxsize=4)
def ascii_bpe_vocab(n_merges: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of a byte-level BPE vocab over ASCII only: every token decodes to valid
    ASCII text, so random sampling never produces broken UTF-8 that the server would hold back."""
    base = [_byte_char(b) for b in [0x0A, *range(0x20, 0x7F)]]
    corpus: Counter[tuple[str, ...]] = Counter()
    for w in words(random.Random("merges"), 20000):
        corpus[tuple(_byte_char(0x20) + w)] += 1
    vocab = list(base)
    merges: list[str] = []
    for _ in range(n_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in corpus.items():
            for a, b in zip(word, word[1:]):
                pairs[(a, b)] += count
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        merges.append(f"{a} {b}")
        vocab.append(a + b)
        merged: Counter[tuple[str, ...]] = Counter()
        for word, count in corpus.items():
            out: list[str] = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        corpus = merged
    types = [1] * len(vocab) + [3] * len(SPECIAL_TOKENS)  # gguf TokenType: 1 NORMAL, 3 CONTROL
    return vocab + list(SPECIAL_TOKENS), types, merges


def write_model(spec: ModelSpec, path: Path) -> dict[str, Any]:
    """Write a random-weight llama GGUF with gguf-py (pip install gguf numpy)."""
    try:
        import gguf
        import numpy as np
    except ImportError as exc:
        raise SystemExit(f"[llama_build] writing the models needs gguf and numpy ({exc}): "
                         ".venv/bin/pip install gguf numpy") from exc
    tokens, types, merges = ascii_bpe_vocab(spec.n_merges)
    n_vocab = len(tokens)
    head_dim = spec.n_embd // spec.n_head
    rng = np.random.default_rng(spec.seed)
    tmp = path.with_suffix(".tmp")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name(f"splitstream-bench-{spec.name}")
    w.add_context_length(spec.n_ctx)
    w.add_embedding_length(spec.n_embd)
    w.add_block_count(spec.n_layer)
    w.add_feed_forward_length(spec.n_ff)
    w.add_head_count(spec.n_head)
    w.add_head_count_kv(spec.n_head_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(n_vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    eot = tokens.index("<|endoftext|>")
    w.add_bos_token_id(eot)
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)

    def mat(rows: int, cols: int) -> Any:
        return (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(np.float16)

    ones = np.ones(spec.n_embd, dtype=np.float32)
    kv = head_dim * spec.n_head_kv
    w.add_tensor("token_embd.weight", mat(n_vocab, spec.n_embd))
    for i in range(spec.n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", ones)
        w.add_tensor(f"blk.{i}.attn_q.weight", mat(spec.n_embd, spec.n_embd))
        w.add_tensor(f"blk.{i}.attn_k.weight", mat(kv, spec.n_embd))
        w.add_tensor(f"blk.{i}.attn_v.weight", mat(kv, spec.n_embd))
        w.add_tensor(f"blk.{i}.attn_output.weight", mat(spec.n_embd, spec.n_embd))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", ones)
        w.add_tensor(f"blk.{i}.ffn_gate.weight", mat(spec.n_ff, spec.n_embd))
        w.add_tensor(f"blk.{i}.ffn_up.weight", mat(spec.n_ff, spec.n_embd))
        w.add_tensor(f"blk.{i}.ffn_down.weight", mat(spec.n_embd, spec.n_ff))
    w.add_tensor("output_norm.weight", ones)
    w.add_tensor("output.weight", mat(n_vocab, spec.n_embd))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.rename(path)
    return {"path": str(path), "bytes": path.stat().st_size, "params": spec.params(n_vocab), "n_vocab": n_vocab}


def ensure_models(version: str = LLAMA_CPP_PYTHON_VERSION, specs: tuple[ModelSpec, ...] = MODELS
                  ) -> dict[str, dict[str, Any]]:
    """{name: {path, bytes, params, n_vocab, spec}} of the bench models, written when not cached."""
    d = cache_dir(version) / "models"
    d.mkdir(parents=True, exist_ok=True)
    out: dict[str, dict[str, Any]] = {}
    n_vocab = len(ascii_bpe_vocab(MODELS[0].n_merges)[0])
    for spec in specs:
        path = d / f"{spec.tag()}.gguf"
        if path.exists():
            info = {"path": str(path), "bytes": path.stat().st_size, "params": spec.params(n_vocab),
                    "n_vocab": n_vocab}
        else:
            _say(f"writing {path.name} (random weights)")
            info = write_model(spec, path)
        out[spec.name] = info | {"spec": asdict(spec)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--version", default=LLAMA_CPP_PYTHON_VERSION, help="llama-cpp-python sdist version")
    ap.add_argument("-j", "--jobs", type=int, default=2)
    ap.add_argument("--print", action="store_true", help="print only the binary's path")
    args = ap.parse_args()
    binary = build(args.version, args.jobs, quiet=args.print)
    if args.print:
        print(binary)
        return 0
    print(binary)
    for name, info in ensure_models(args.version).items():
        print(f"{name}: {info['path']} ({info['params'] / 1e6:.1f} M parameters, {info['bytes'] / 2**20:.0f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
