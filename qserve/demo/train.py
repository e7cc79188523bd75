"""Train qserve's bundled demo model: a small GQA Llama on the Python standard library's source.

Offline tooling, not part of the runtime: it imports only torch, transformers, tokenizers, safetensors
and the standard library, so it also runs as a plain script before the package is installed::

    python -m qserve.demo.train --out qserve/demo/model      # or: python qserve/demo/train.py
    python qserve/demo/train.py --steps 40 --out /tmp/smoke/model --artifacts /tmp/smoke   # smoke run

Everything is deterministic for a given ``--steps`` (fixed seeds, sorted file lists, one generator for the
data order). ``--steps auto`` instead times the first training steps and picks the step count that fits
``--time-budget`` minutes; the chosen count is recorded in ``train_results.json`` and the model card so the
run can be repeated exactly with ``--steps N``.

Corpus (see ``collect_corpus``): every ``*.py`` file under ``sysconfig.get_paths()["stdlib"]`` (licence PSF),
minus third-party code (site-packages, dist-packages), test suites (any path component ``test``, ``tests``
or ``idle_test``: ``test/``, ``idlelib/idle_test/``, ``lib2to3/tests/``, ``ctypes/test/``,
``distutils/tests/``, ...), and generated files (``pydoc_data/``, ``_sysconfigdata*``, ``config-*/``, the
charmap tables in ``encodings/`` that say "generated ... with gencodec.py"). Modules whose top-level name is
in ``HELDOUT_MODULES`` are held out of both tokenizer and model training and make up ``heldout.txt``.

Outputs: a standard Hugging Face directory at ``--out`` (config.json, model.safetensors in bf16,
tokenizer.json, tokenizer_config.json, special_tokens_map.json, generation_config.json), the held-out and
calibration texts in ``--data-dir``, and loss.csv, loss.png, train_results.json and MODEL_CARD.md in
``--artifacts``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import platform
import random
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent

# Top-level stdlib modules/packages held out of training (tokenizer and model): the source of heldout.txt.
# A fixed, documented list of everyday pure-Python modules (~700 KB, ~7% of the corpus).
HELDOUT_MODULES: tuple[str, ...] = (
    "bisect", "calendar", "colorsys", "configparser", "csv", "dataclasses", "difflib", "fnmatch",
    "fractions", "gettext", "glob", "graphlib", "heapq", "ipaddress", "json", "pprint", "queue", "sched",
    "shlex", "statistics", "textwrap", "tomllib", "wave", "wsgiref", "zipapp",
)  # fmt: skip
EXCLUDED_DIRS = ("site-packages", "dist-packages", "lib-dynload", "__pycache__", "pydoc_data")
TEST_DIRS = ("test", "tests", "idle_test")

EOT = "<|endoftext|>"
PAD = "<|pad|>"
CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
# Plain role-tag template: "<|user|>\n{content}\n" per message, "<|assistant|>\n" as generation prompt;
# assistant turns end with <|endoftext|> (the eos) so a chat reply stops where a document would.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

HELDOUT_MAX_BYTES = 1_000_000
CALIB_MAX_BYTES = 250_000
CALIB_CHUNK_CHARS = 3000  # each calibration file contributes its first ~3000 characters (cut at a line end)
CALIB_FILE_STRIDE = 7  # every 7th training file (sorted order) feeds the calibration text
EVAL_TOKENS = 65536  # held-out perplexity: first 64Ki tokens of heldout.txt ...
EVAL_WINDOW = 512  # ... in non-overlapping 512-token windows, first token of each unscored
PROMPTS = ("def fibonacci(n):", "import os\n")


@dataclass
class TrainConfig:
    # model shape: GQA Llama, head_dim 32; every Linear in-feature is a multiple of 128 (int4 group size)
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 768  # 3x hidden, a multiple of 128 so down_proj groups evenly
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 2  # 4 query heads share each KV head
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    # optimisation
    seq_len: int = 512  # train at the evaluation window so every position up to 512 is seen
    batch_size: int = 8  # 4096 tokens per step
    lr: float = 2e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    steps: int = 0  # filled in (given or measured)
    eval_every: int = 100
    seed: int = 1234
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------
# corpus


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def _excluded(rel: Path, head: bytes) -> str | None:
    parts = rel.parts
    if parts[0] in EXCLUDED_DIRS or parts[0].startswith("config-"):
        return "third-party/generated directory"
    if any(p in TEST_DIRS for p in parts[:-1]):
        return "test suite"
    if rel.name.startswith("_sysconfigdata"):
        return "generated"
    if b"gencodec.py" in head:
        return "generated codec table"
    return None


def collect_corpus(root: Path) -> tuple[list[tuple[str, str]], list[tuple[str, str]], dict]:
    """Return (train, heldout) lists of (relative path, text), both in sorted path order, and stats."""
    train: list[tuple[str, str]] = []
    heldout: list[tuple[str, str]] = []
    excluded: dict[str, int] = {}
    stats: dict[str, Any] = {"excluded": excluded, "undecodable": 0}
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        rel = path.relative_to(root)
        if not path.is_file():
            continue
        raw = path.read_bytes()
        why = _excluded(rel, raw[:400])
        if why:
            excluded[why] = excluded.get(why, 0) + 1
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            stats["undecodable"] += 1
            continue
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        top = rel.parts[0][:-3] if len(rel.parts) == 1 else rel.parts[0]
        (heldout if top in HELDOUT_MODULES else train).append((rel.as_posix(), text))
    stats["train_files"] = len(train)
    stats["train_bytes"] = sum(len(t.encode()) for _, t in train)
    stats["heldout_files"] = len(heldout)
    stats["heldout_bytes"] = sum(len(t.encode()) for _, t in heldout)
    return train, heldout, stats


def _join_limited(texts: list[str], max_bytes: int) -> str:
    """Join with blank lines, stopping before the file that would push the result over max_bytes."""
    out: list[str] = []
    size = 0
    for t in texts:
        t = t.rstrip("\n") + "\n"
        n = len(t.encode()) + (1 if out else 0)
        if size + n > max_bytes:
            break
        out.append(t)
        size += n
    return "\n".join(out)


def write_texts(train: list[tuple[str, str]], heldout: list[tuple[str, str]], data_dir: Path) -> dict:
    data_dir.mkdir(parents=True, exist_ok=True)
    held = _join_limited([t for _, t in heldout], HELDOUT_MAX_BYTES)
    chunks = []
    for _, text in train[::CALIB_FILE_STRIDE]:
        cut = text[:CALIB_CHUNK_CHARS]
        if len(text) > CALIB_CHUNK_CHARS and "\n" in cut:
            cut = cut[: cut.rindex("\n") + 1]
        if cut.strip():
            chunks.append(cut)
    calib = _join_limited(chunks, CALIB_MAX_BYTES)
    (data_dir / "heldout.txt").write_text(held, encoding="utf-8")
    (data_dir / "calib.txt").write_text(calib, encoding="utf-8")
    return {"heldout_txt_bytes": len(held.encode()), "calib_txt_bytes": len(calib.encode())}


# ----------------------------------------------------------------------------------------------------------
# tokenizer


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE (GPT-2 pre-tokenizer regex) trained on the training texts only."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = [EOT, PAD, *CHAT_TOKENS]  # ids 0..4
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOT,
        bos_token=EOT,  # GPT-2 style: documents are separated by <|endoftext|>; nothing is prepended
        unk_token=None,
        pad_token=PAD,
        additional_special_tokens=list(CHAT_TOKENS),
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tokenizer(fast, out: Path) -> None:
    fast.save_pretrained(str(out))
    # Keep the chat template inside tokenizer_config.json (readable by any tool), not a side file.
    side = out / "chat_template.jinja"
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = CHAT_TEMPLATE
    # transformers v5 writes its own class name and a list-valued ``extra_special_tokens``; v4 reads neither.
    # The v4 spellings below load unchanged in both.
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg.pop("extra_special_tokens", None)
    cfg["additional_special_tokens"] = list(CHAT_TOKENS)
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    if side.exists():
        side.unlink()
    smap = out / "special_tokens_map.json"
    if not smap.exists():
        smap.write_text(
            json.dumps(
                {
                    "bos_token": EOT,
                    "eos_token": EOT,
                    "pad_token": PAD,
                    "additional_special_tokens": list(CHAT_TOKENS),
                },
                indent=2,
            )
            + "\n"
        )


def encode_docs(fast, texts: list[str]) -> torch.Tensor:
    """One token stream: doc, <|endoftext|>, doc, <|endoftext|>, ..."""
    eot = fast.convert_tokens_to_ids(EOT)
    ids: list[int] = []
    enc = fast.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    for e in enc:
        ids.extend(e.ids)
        ids.append(eot)
    return torch.tensor(ids, dtype=torch.int32)


# ----------------------------------------------------------------------------------------------------------
# model


def llama_config(cfg: TrainConfig, fast):
    from transformers import LlamaConfig

    eot = fast.convert_tokens_to_ids(EOT)
    kwargs: dict[str, Any] = dict(  # a dict: v4 and v5 type the rope fields differently
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.hidden_size // cfg.num_attention_heads,
        hidden_act="silu",
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=1e-5,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
        initializer_range=0.02,
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=fast.convert_tokens_to_ids(PAD),
        architectures=["LlamaForCausalLM"],
    )
    return LlamaConfig(**kwargs)


def build_model(lcfg, seed: int):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM._from_config(lcfg, attn_implementation="sdpa", dtype=torch.float32)
    return model


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup for warmup_steps, then cosine from lr down to min_lr at cfg.steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


class Batches:
    """Epochs over non-overlapping (seq_len+1)-token chunks of the stream, shuffled by one seeded generator."""

    def __init__(self, stream: torch.Tensor, seq_len: int, batch_size: int, seed: int):
        self.stream, self.t, self.b = stream, seq_len + 1, batch_size
        self.g = torch.Generator().manual_seed(seed)
        self.epoch = 0
        self._new_epoch()

    def _new_epoch(self) -> None:
        offset = int(torch.randint(0, self.t, (1,), generator=self.g))
        n = (len(self.stream) - offset) // self.t
        self.chunks = self.stream[offset : offset + n * self.t].view(n, self.t)
        self.order = torch.randperm(n, generator=self.g)
        self.pos = 0
        self.epoch += 1

    def next(self) -> torch.Tensor:
        if self.pos + self.b > len(self.order):
            self._new_epoch()
        idx = self.order[self.pos : self.pos + self.b]
        self.pos += self.b
        return self.chunks[idx].long()  # (B, T+1)


@torch.no_grad()
def heldout_loss(model, windows: torch.Tensor, autocast: bool) -> float:
    """Mean next-token NLL over (N, W) windows (first token of each unscored)."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), 8):
        x = windows[i : i + 8]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=x).logits.float()  # (B, W, V)
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(nll)
        count += x[:, 1:].numel()
    model.train()
    return total / count


def eval_windows(fast, text: str) -> torch.Tensor:
    ids = fast.encode(text)[:EVAL_TOKENS]
    n = len(ids) // EVAL_WINDOW
    return torch.tensor(ids[: n * EVAL_WINDOW]).view(n, EVAL_WINDOW)


# ----------------------------------------------------------------------------------------------------------
# training


def train(args: argparse.Namespace) -> None:
    t_start = time.time()
    torch.set_num_threads(args.threads)
    random.seed(0)
    cfg = TrainConfig(seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    out, data_dir, art = Path(args.out), Path(args.data_dir), Path(args.artifacts)
    for d in (out, data_dir, art):
        d.mkdir(parents=True, exist_ok=True)

    root = stdlib_root()
    train_docs, held_docs, stats = collect_corpus(root)
    stats.update(write_texts(train_docs, held_docs, data_dir))
    log(f"corpus {root}: {json.dumps(stats)}")

    t0 = time.time()
    fast = train_tokenizer([t for _, t in train_docs], cfg.vocab_size)
    save_tokenizer(fast, out)
    from transformers import AutoTokenizer

    fast = AutoTokenizer.from_pretrained(str(out))  # use exactly what was saved
    assert len(fast) == cfg.vocab_size, (len(fast), cfg.vocab_size)
    stream = encode_docs(fast, [t for _, t in train_docs])
    held_text = (data_dir / "heldout.txt").read_text(encoding="utf-8")
    windows = eval_windows(fast, held_text)
    stats["tokenizer_s"] = round(time.time() - t0, 1)
    stats["train_tokens"] = len(stream)
    stats["train_bytes_per_token"] = round(stats["train_bytes"] / len(stream), 3)
    log(f"tokenizer: {len(fast)} tokens, {len(stream)} training tokens, {stats['tokenizer_s']}s")

    lcfg = llama_config(cfg, fast)
    model = build_model(lcfg, cfg.seed)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params / 1e6:.3f}M parameters")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=cfg.betas,
        fused=True,
    )
    batches = Batches(stream, cfg.seq_len, cfg.batch_size, cfg.seed)
    auto = args.steps == "auto"
    cfg.steps = 10**9 if auto else int(args.steps)
    assert auto or cfg.steps > cfg.warmup_steps or args.smoke, "steps must exceed warmup_steps"
    if args.smoke:
        cfg.warmup_steps = max(1, cfg.steps // 10)
        cfg.eval_every = max(1, cfg.steps // 2)
    budget_s = args.time_budget * 60.0

    rows: list[dict] = []
    csv_path = art / "loss.csv"
    fcsv = open(csv_path, "w", newline="")  # noqa: SIM115 - flushed every step, closed after the loop
    writer = csv.DictWriter(
        fcsv, fieldnames=["step", "tokens", "lr", "train_loss", "heldout_loss", "elapsed_s"]
    )
    writer.writeheader()
    model.train()
    t_train = time.time()
    t_measure = t_train
    step = 0
    while step < cfg.steps:
        lr = lr_at(step, cfg)
        for gparam in opt.param_groups:
            gparam["lr"] = lr
        xy = batches.next()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=xy[:, :-1]).logits  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(
            logits.float().view(-1, logits.size(-1)), xy[:, 1:].reshape(-1)
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step == 5:
            t_measure = time.time()
        if auto and step == 25:
            per_step = (time.time() - t_measure) / 20
            remaining = budget_s - (time.time() - t_train)
            cfg.steps = max(cfg.warmup_steps + 1, step + int(remaining / per_step))
            log(
                f"auto steps: {per_step:.3f}s/step over steps 5..25 -> {cfg.steps} steps in {args.time_budget} min"
            )
        row = {
            "step": step,
            "tokens": step * cfg.batch_size * cfg.seq_len,
            "lr": f"{lr:.6g}",
            "train_loss": f"{loss.item():.4f}",
            "heldout_loss": "",
            "elapsed_s": f"{time.time() - t_train:.1f}",
        }
        if step % cfg.eval_every == 0 or step == cfg.steps:
            row["heldout_loss"] = f"{heldout_loss(model, windows[:16], autocast=True):.4f}"
        rows.append(row)
        writer.writerow(row)
        fcsv.flush()
        if step % 10 == 0 or row["heldout_loss"]:
            log(
                f"step {step}/{cfg.steps if cfg.steps < 10**9 else '?'} loss {row['train_loss']} lr {lr:.2e} "
                f"held {row['heldout_loss'] or '-'} {row['elapsed_s']}s epoch {batches.epoch}"
            )
    fcsv.close()
    train_s = time.time() - t_train

    # ---- save a standard HF directory in bf16
    model.config.use_cache = True
    model.to(torch.bfloat16).save_pretrained(str(out), safe_serialization=True)
    from transformers import GenerationConfig

    GenerationConfig(
        bos_token_id=lcfg.bos_token_id, eos_token_id=lcfg.eos_token_id, pad_token_id=lcfg.pad_token_id
    ).save_pretrained(str(out))
    _fix_config(out)
    for p in out.iterdir():
        p.chmod(0o644)  # safetensors writes 0600; the files ship in the package
    log(f"saved {out}")

    # ---- evaluate what was saved, through plain transformers in fp32
    results = evaluate(out, lcfg, cfg, held_text)
    results.update(
        params=n_params,
        steps=cfg.steps,
        train_seconds=round(train_s, 1),
        total_seconds=round(time.time() - t_start, 1),
        final_train_loss=float(rows[-1]["train_loss"]),
        final_train_loss_avg20=round(sum(float(r["train_loss"]) for r in rows[-20:]) / len(rows[-20:]), 4),
        epochs=round(cfg.steps * cfg.batch_size * (cfg.seq_len + 1) / len(stream), 2),
        corpus=stats,
        train_config={k: v for k, v in asdict(cfg).items() if k != "extra"},
        files={p.name: p.stat().st_size for p in sorted(out.iterdir())},
        data_files={p.name: p.stat().st_size for p in sorted(data_dir.iterdir())},
        environment={
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "tokenizers": __import__("tokenizers").__version__,
            "threads": args.threads,
            "stdlib": str(root),
        },
        command=" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        machine_note=args.machine_note,
    )
    (art / "train_results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(rows, art / "loss.png", results)
    write_card(art / "MODEL_CARD.md", results)
    log(
        f"done: {json.dumps({k: results[k] for k in ('params', 'steps', 'train_seconds', 'ppl_trained', 'ppl_untrained')})}"
    )


def _fix_config(out: Path) -> None:
    """Spell the dtype both ways (v4 ``torch_dtype``, v5 ``dtype``) so every reader sees bfloat16."""
    p = out / "config.json"
    c = json.loads(p.read_text())
    c["torch_dtype"] = "bfloat16"
    c["dtype"] = "bfloat16"
    c["architectures"] = ["LlamaForCausalLM"]
    c["rope_theta"] = c.get("rope_parameters", {}).get("rope_theta", 10000.0)  # v4 reads it at top level
    p.write_text(json.dumps(c, indent=2, sort_keys=True) + "\n")


@torch.no_grad()
def evaluate(out: Path, lcfg, cfg: TrainConfig, held_text: str) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    windows = eval_windows(tok, held_text)
    nll_trained = heldout_loss(model, windows, autocast=False)
    untrained = build_model(lcfg, cfg.seed).eval()  # same shape and init as step 0 of training
    nll_untrained = heldout_loss(untrained, windows, autocast=False)
    completions = {}
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt")
        gen = model.generate(**ids, max_new_tokens=64, do_sample=False, pad_token_id=tok.pad_token_id)
        completions[prompt] = tok.decode(gen[0, ids["input_ids"].shape[1] :], skip_special_tokens=False)
    sha = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    return {
        "eval_tokens_scored": int(windows.numel() - len(windows)),
        "eval_windows": len(windows),
        "nll_trained": round(nll_trained, 4),
        "ppl_trained": round(math.exp(nll_trained), 3),
        "nll_untrained": round(nll_untrained, 4),
        "ppl_untrained": round(math.exp(nll_untrained), 1),
        "completions": completions,
        "model_sha256": sha,
    }


def plot(rows: list[dict], path: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    loss = [float(r["train_loss"]) for r in rows]
    ema, smooth = None, []
    for v in loss:
        ema = v if ema is None else 0.95 * ema + 0.05 * v
        smooth.append(ema)
    held = [(r["step"], float(r["heldout_loss"])) for r in rows if r["heldout_loss"]]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.plot(steps, loss, color="tab:blue", alpha=0.25, lw=0.8, label="train loss (per step)")
    ax.plot(steps, smooth, color="tab:blue", lw=1.6, label="train loss (EMA 0.95)")
    if held:
        ax.plot(
            *zip(*held, strict=True),
            "o-",
            color="tab:orange",
            ms=3,
            lw=1.4,
            label="held-out loss (16x512 tokens)",
        )
    ax.set_xlabel("step (4096 tokens each)" if rows else "step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_ylim(0, min(9.0, max(loss) + 0.2))
    ax.grid(alpha=0.3)
    ax.set_title(
        f"qserve demo model ({results['params'] / 1e6:.2f}M params): training on CPython stdlib source"
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_card(path: Path, r: dict) -> None:
    c, tc, s = r["corpus"], r["train_config"], r["corpus"]
    size = r["files"].get("model.safetensors", 0)
    note = f"; {r['machine_note']}" if r.get("machine_note") else ""
    comp = "\n\n".join(f"Prompt `{p!r}` →\n\n```python\n{p}{t}\n```" for p, t in r["completions"].items())
    files = "\n".join(f"| `model/{k}` | {v:,} |" for k, v in r["files"].items())
    files += "\n" + "\n".join(f"| `data/{k}` | {v:,} |" for k, v in r["data_files"].items())
    text = f"""# qserve demo model

A {r["params"] / 1e6:.2f}M-parameter Llama (GQA) trained from scratch by qserve on the source code of the
Python standard library, so that qserve ships a real (if tiny) language model with no download: `demo` names
it wherever a MODEL is accepted. It writes plausible Python; it knows nothing else. Use it to exercise the
serving stack (quantization, KV cache, batching), not for anything that needs a good model.

Reproduce: `python -m qserve.demo.train {r["command"].split(" ", 1)[1] if " " in r["command"] else ""}` (or
`python qserve/demo/train.py` with the same arguments); seed {tc["seed"]} fixed; torch {r["environment"]["torch"]},
transformers {r["environment"]["transformers"]}, tokenizers {r["environment"]["tokenizers"]}, CPython
{r["environment"]["python"]} standard library. Bit-identical weights need the same library versions, CPU kind and
thread count (`--threads`); another thread count gives the same recipe with float-rounding differences.

## Corpus

* Source: every `*.py` file of the CPython {r["environment"]["python"]} standard library
  (`sysconfig.get_paths()["stdlib"]`), licence PSF (Python Software Foundation License), read in sorted path order,
  CRLF normalised to LF, otherwise verbatim.
* Excluded: `site-packages/`, `dist-packages/`, `lib-dynload/`, `__pycache__/`, `config-*/` (not stdlib source);
  test suites: any file below a directory named `test`, `tests` or `idle_test` (`test/`, `idlelib/idle_test/`,
  `lib2to3/tests/`, `ctypes/test/`, `distutils/tests/`, ...); generated files: `pydoc_data/` (a dump of the
  docs), `_sysconfigdata*`, and the `encodings/` charmap tables whose header says "generated ... with
  gencodec.py"; files that are not valid UTF-8. Counts of excluded files: {json.dumps(s["excluded"])}.
* Held-out rule: a fixed list of top-level modules/packages is left out of tokenizer *and* model training:
  `{", ".join(HELDOUT_MODULES)}` ({c["heldout_files"]} files, {c["heldout_bytes"]:,} bytes).
* Training text: the remaining {c["train_files"]} files, {c["train_bytes"]:,} bytes =
  {c["train_tokens"]:,} tokens ({c["train_bytes_per_token"]} bytes/token); each file is followed by
  `<|endoftext|>` in one token stream.
* `data/heldout.txt` ({r["data_files"].get("heldout.txt", 0):,} bytes): the held-out files in sorted path order,
  joined by a blank line (no special tokens), capped at 1 MB at a file boundary.
* `data/calib.txt` ({r["data_files"].get("calib.txt", 0):,} bytes): calibration text for activation-aware
  quantization, from the *training* side: every {CALIB_FILE_STRIDE}th training file in sorted order contributes
  its first ~{CALIB_CHUNK_CHARS} characters (cut at a line end), joined by blank lines, capped at 250 KB.

## Architecture (`LlamaForCausalLM`)

| field | value |
|---|---|
| parameters | {r["params"]:,} (tied input/output embeddings) |
| `model.safetensors` | {size:,} bytes, bfloat16 |
| hidden / intermediate | {tc["hidden_size"]} / {tc["intermediate_size"]} (SwiGLU, silu) |
| layers | {tc["num_hidden_layers"]} |
| attention heads / KV heads | {tc["num_attention_heads"]} / {tc["num_key_value_heads"]} (GQA, head_dim {tc["hidden_size"] // tc["num_attention_heads"]}) |
| vocab | {tc["vocab_size"]} |
| positions | RoPE, theta {tc["rope_theta"]:g}, `max_position_embeddings` {tc["max_position_embeddings"]} (trained at {tc["seq_len"]}) |
| norm | RMSNorm, eps 1e-5 |

Every linear layer's input width (256, 768) is a multiple of 128, so int4/int8 group sizes up to 128 divide
evenly.

## Tokenizer

Byte-level BPE (`tokenizers`, GPT-2 pre-tokenizer regex, no prefix space), vocab {tc["vocab_size"]}, trained on the
training text only. Special tokens: `<|endoftext|>` = 0 (eos; also named bos, but nothing is prepended when
encoding, like GPT-2), `<|pad|>` = 1, `<|system|>` = 2, `<|user|>` = 3, `<|assistant|>` = 4. Chat template
(in `tokenizer_config.json`): each message becomes `<|role|>\\n` + content + `\\n`, assistant messages end with
`<|endoftext|>`, and the generation prompt is `<|assistant|>\\n`. The model never saw chat data.

## Training

| | |
|---|---|
| steps | {r["steps"]} × {tc["batch_size"]} sequences × {tc["seq_len"]} tokens = {r["steps"] * tc["batch_size"] * tc["seq_len"]:,} tokens ({r["epochs"]} epochs) |
| optimizer | AdamW, betas {tuple(tc["betas"])}, weight decay {tc["weight_decay"]} (matrices only), grad clip {tc["grad_clip"]} |
| schedule | linear warmup {tc["warmup_steps"]} steps to {tc["lr"]:g}, cosine to {tc["min_lr"]:g} |
| precision | fp32 weights and optimizer, bf16 autocast for the forward/backward |
| data order | non-overlapping {tc["seq_len"] + 1}-token chunks, reshuffled each epoch with a random offset (seed {tc["seed"]}) |
| init | normal(0, 0.02), `torch.manual_seed({tc["seed"]})` |
| wall time | {r["train_seconds"] / 60:.1f} min training, {r["total_seconds"] / 60:.1f} min total, {_threads(r["environment"]["threads"])}{note} |
| final train loss | {r["final_train_loss"]} (last step), {r["final_train_loss_avg20"]} (mean of last 20 steps) |

![loss curves](loss.png)

Per-step losses are in `loss.csv`; all numbers on this page are in `train_results.json`.

## Evaluation

Held-out perplexity with plain `transformers` in fp32: the first {EVAL_TOKENS:,} tokens of `data/heldout.txt`
(tokenized with `tokenizer.encode`, which adds no special tokens) in {r["eval_windows"]} non-overlapping
{EVAL_WINDOW}-token windows, the first token of each window unscored ({r["eval_tokens_scored"]:,} tokens scored).
The same procedure as `qserve.eval.perplexity(llm, text, context={EVAL_WINDOW}, max_tokens={EVAL_TOKENS})`.

| model | NLL (nats/token) | perplexity |
|---|---|---|
| trained (this checkpoint, weights bf16, computed in fp32) | {r["nll_trained"]} | **{r["ppl_trained"]}** |
| untrained (same shape and seed, random init) | {r["nll_untrained"]} | {r["ppl_untrained"]} |

Greedy completions (64 new tokens, `transformers` `generate`, fp32, `do_sample=False`):

{comp}

Limitations: the model saw about {r["steps"] * tc["batch_size"] * tc["seq_len"] / 1e6:.1f}M tokens ({r["epochs"]} epochs) of one code base;
it is compute-limited and much weaker than any real code model. Greedy decoding often falls into loops (e.g.
repeated lines); it writes Python-shaped text, not working programs.

## Files

| file | bytes |
|---|---|
{files}

`model.safetensors` sha256: `{r["model_sha256"]}`.
"""
    path.write_text(text)


def _threads(n: int) -> str:
    return f"{n} CPU thread" + ("" if n == 1 else "s")


def card_only(args: argparse.Namespace) -> None:
    """Rewrite loss.png and MODEL_CARD.md from an earlier run's train_results.json and loss.csv."""
    art = Path(args.artifacts)
    results = json.loads((art / "train_results.json").read_text())
    if args.machine_note is not None:
        results["machine_note"] = args.machine_note
        (art / "train_results.json").write_text(json.dumps(results, indent=2) + "\n")
    with open(art / "loss.csv", newline="") as f:
        rows = [{**r, "step": int(r["step"])} for r in csv.DictReader(f)]
    plot(rows, art / "loss.png", results)
    write_card(art / "MODEL_CARD.md", results)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(HERE / "model"), help="Hugging Face model directory to write")
    ap.add_argument("--data-dir", default=str(HERE / "data"), help="where heldout.txt and calib.txt go")
    ap.add_argument("--artifacts", default=str(HERE), help="where loss.csv, loss.png, MODEL_CARD.md go")
    ap.add_argument(
        "--steps",
        default="3000",
        help="training steps (3000, the shipped model: ~70-75 min on 2 idle cores), or 'auto' to fit --time-budget",
    )
    ap.add_argument("--time-budget", type=float, default=36.0, help="minutes of training for --steps auto")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--smoke", action="store_true", help="allow tiny step counts (pipeline check only)")
    ap.add_argument(
        "--machine-note", default=None, help="a sentence on the machine/timing for the model card"
    )
    ap.add_argument(
        "--card-only", action="store_true", help="only rewrite loss.png and MODEL_CARD.md from --artifacts"
    )
    args = ap.parse_args(argv)
    if args.card_only:
        card_only(args)
    else:
        train(args)


if __name__ == "__main__":
    main()
