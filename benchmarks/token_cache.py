"""Token cache on the stdlib corpus: bytes per token against fidelity to the dense teacher.

A GPT-2-style teacher (4 layers x 128, random init, seeded) is trained briefly on the train
split of the Python standard library corpus, tokenized with a byte-level BPE of 4096 tokens
trained on that split. Held-out (val) sequences are cached for several k; for each k the
table gives the stored bytes per token and, against the teacher's dense distribution p:
mean KL(p || p_hat) per token with p_hat the cache's reconstruction (tail spread uniformly),
the same at T = 2 (p_hat re-temperatured from the stored T = 1 values, p = softmax(z / 2)),
the mean tail mass and the top-1 agreement of p_hat with p.

With ``--students`` (on in the full run), a 2 x 64 student is distilled for each of 3 seeds
from the cache (k = 8, and k = 31: the largest k within 128 bytes/token; sparse KL) and online
(dense KL), ``0.5 KL + 0.5 CE``, same init and batch order per seed, and its held-out
perplexity compared.

    python benchmarks/token_cache.py [--quick | --smoke] [--[no-]students] [--json out.json]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import add_mode_args, mode_of, pick, set_threads, write_json  # noqa: E402

from kdkit.cache import TokenCache  # noqa: E402
from kdkit.data.stdlib_text import load_stdlib_corpus  # noqa: E402
from kdkit.data.text import IGNORE_INDEX, TokenBlocks, TokenSequences, collate_sequences  # noqa: E402
from kdkit.data.tokenizer import encode_documents, stdlib_bpe  # noqa: E402
from kdkit.losses import CrossEntropyLoss, KLDivLoss, SparseKLDivLoss  # noqa: E402

VOCAB = 4096
SEQ = 64


def _gpt(layers: int, dim: int, seed: int) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=SEQ,
        n_embd=dim,
        n_layer=layers,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,  # <|endoftext|> of the BPE
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def _train_teacher(teacher: torch.nn.Module, stream: torch.Tensor, steps: int) -> float:
    blocks = TokenBlocks(stream, SEQ)
    g = torch.Generator().manual_seed(1234)
    opt = torch.optim.AdamW(teacher.parameters(), lr=2e-3)
    ce = CrossEntropyLoss()
    teacher.train()
    loss = torch.tensor(0.0)
    for _ in range(steps):
        pick_ = torch.randint(0, len(blocks), (16,), generator=g).tolist()
        x = torch.stack([blocks[i][0] for i in pick_])
        y = torch.stack([blocks[i][1] for i in pick_])
        loss = ce(teacher(x).logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    teacher.eval()
    return loss.item()


def _windows(stream: torch.Tensor, count: int) -> TokenSequences:
    """The first ``count`` windows of ``SEQ`` inputs (+ 1 label) of a token stream."""
    count = min(count, (len(stream) - 1) // SEQ)
    return TokenSequences([stream[i * SEQ : (i + 1) * SEQ + 1] for i in range(count)], SEQ)


def _batches(data: TokenSequences, batch: int) -> list[tuple[torch.Tensor, ...]]:
    return [
        collate_sequences([data[i] for i in range(s, min(s + batch, len(data)))])
        for s in range(0, len(data), batch)
    ]


def _fidelity(
    teacher: torch.nn.Module, cache: TokenCache, batches: list[tuple[torch.Tensor, ...]]
) -> dict[str, float]:
    kl1 = kl2 = tail = agree = 0.0
    tokens = 0
    with torch.no_grad():
        for ids, labels, index in batches:
            keep = labels != IGNORE_INDEX
            z = teacher(ids).logits.float()[keep]
            cached = cache.teacher_output(index)
            for temperature in (1.0, 2.0):
                p = torch.log_softmax(z / temperature, -1)
                q = cached.dense(temperature)[keep]
                kl = (p.exp() * (p - q)).sum(-1).sum().item()
                if temperature == 1.0:
                    kl1 += kl
                    agree += (q.argmax(-1) == p.argmax(-1)).sum().item()
                else:
                    kl2 += kl
            tail += cached.log_tail[keep].exp().sum().item()
            tokens += int(keep.sum())
    return {
        "kl_t1": kl1 / tokens,
        "kl_t2": kl2 / tokens,
        "tail_mass": tail / tokens,
        "top1_agreement": agree / tokens,
        "tokens": tokens,
    }


def _perplexity(model: torch.nn.Module, batches: list[tuple[torch.Tensor, ...]]) -> float:
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels, _ in batches:
            logits = model(ids).logits
            total += CrossEntropyLoss(reduction="sum")(logits, labels).item()
            count += int((labels != IGNORE_INDEX).sum())
    return float(torch.tensor(total / count).exp())


def _distil(
    teacher: torch.nn.Module,
    cache: TokenCache | None,
    batches: list[tuple[torch.Tensor, ...]],
    epochs: int,
    seed: int,
) -> torch.nn.Module:
    student = _gpt(2, 64, seed)
    student.train()
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    ce = CrossEntropyLoss()
    sparse, dense = SparseKLDivLoss(ignore_index=IGNORE_INDEX), KLDivLoss(ignore_index=IGNORE_INDEX)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for b in torch.randperm(len(batches), generator=g).tolist():
            ids, labels, index = batches[b]
            logits = student(ids).logits
            if cache is None:
                with torch.no_grad():
                    kd = dense(logits, teacher(ids).logits, target=labels)
            else:
                kd = sparse(logits, cache.teacher_output(index), target=labels)
            loss = 0.5 * kd + 0.5 * ce(logits, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return student


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def run(mode: str = "quick", threads: int | None = None, students: bool | None = None) -> dict:
    threads = set_threads(threads)
    students = mode == "full" if students is None else students
    start = time.perf_counter()
    corpus = load_stdlib_corpus()
    tokenizer = stdlib_bpe(corpus, VOCAB)
    train_docs = [d.text for d in corpus.train][: pick(mode, 8, 60, 230)]
    stream = torch.cat(encode_documents(train_docs, tokenizer))
    val_stream = torch.cat(encode_documents([d.text for d in corpus.val], tokenizer))
    held = _windows(val_stream, pick(mode, 8, 64, 192))
    teacher = _gpt(4, 128, seed=0)
    steps = pick(mode, 5, 80, 500)
    teacher_loss = _train_teacher(teacher, stream, steps)
    held_batches = _batches(held, 16)
    ks = pick(mode, [1, 4], [1, 4, 8, 16, 31, 64], [1, 4, 8, 16, 31, 64])
    rows: list[dict[str, Any]] = []
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="kdkit-bench-tokens-") as tmp:
        for k in ks:
            t0 = time.perf_counter()
            cache = TokenCache.build(
                teacher, held, Path(tmp) / f"held-k{k}", top_k=k, batch_size=16, progress=False
            )
            build_s = time.perf_counter() - t0
            rows.append(
                {
                    "top_k": k,
                    "bytes_per_token": cache.bytes_per_token,
                    "build_s": build_s,
                    **_fidelity(teacher, cache, held_batches),
                }
            )
        if students:
            train = _windows(stream, pick(mode, 2, 40, 800))
            train_batches = _batches(train, 16)
            epochs = pick(mode, 1, 1, 3)
            seeds = pick(mode, [0], [0, 1, 2], [0, 1, 2])
            ppl: dict[str, list[float]] = {}
            for k in pick(mode, [4], [8, 31], [8, 31]):
                cache = TokenCache.build(
                    teacher, train, Path(tmp) / f"train-k{k}", top_k=k, progress=False
                )
                name = f"cache k={k} ({cache.bytes_per_token} B/token)"
                ppl[name] = [
                    _perplexity(_distil(teacher, cache, train_batches, epochs, s), held_batches)
                    for s in seeds
                ]
            ppl["online (dense teacher)"] = [
                _perplexity(_distil(teacher, None, train_batches, epochs, s), held_batches)
                for s in seeds
            ]
            result["students"] = {
                "train_tokens": sum(train.lengths),
                "epochs": epochs,
                "seeds": seeds,
                "perplexity": ppl,
            }
    result.update(
        {
            "benchmark": "token_cache",
            "mode": mode,
            "threads": threads,
            "corpus": corpus.describe(),
            "tokenizer": f"byte-level BPE, {tokenizer.vocab_size} tokens, trained on train split",
            "teacher": "GPT-2 4 layers x 128, 4 heads, ctx 64",
            "teacher_train": {
                "steps": steps,
                "batch": "16 x 64",
                "final_loss": teacher_loss,
                "train_docs": len(train_docs),
            },
            "teacher_val_perplexity": _perplexity(teacher, held_batches),
            "rows": rows,
            "wall_s": time.perf_counter() - start,
            "python": platform.python_version(),
        }
    )
    return result


def report(result: dict[str, Any]) -> str:
    c = result["corpus"]
    t = result["teacher_train"]
    lines = [
        f"- corpus: Python {c['python_version']} standard library source, sha256 "
        f"`{c['sha256'][:16]}…` ({c['files']['train']} / {c['files']['val']} / "
        f"{c['files']['test']} train / val / test files; other Python versions have other "
        "contents and another sha256)",
        f"- {result['tokenizer']}; teacher {result['teacher']}, {t['steps']} AdamW steps of "
        f"{t['batch']} tokens on {t['train_docs']} train files (held-out perplexity "
        f"{result['teacher_val_perplexity']:.1f}); fidelity over {result['rows'][0]['tokens']} "
        "held-out (val) tokens",
        "- bytes / token: fp16 log-probs + uint16 token ids (V = 4096 < 65536) + fp16 log tail "
        "= 4k + 2 (int32 ids: 6k + 2); KL(p || p̂) in nats per token, p̂ = cache "
        "reconstruction with the tail spread uniformly; T = 2 re-temperatures the stored T = 1 "
        "values (kept ratios exact, tail estimated)",
        "",
        "| k | bytes / token | KL(p ‖ p̂), T = 1 | KL, T = 2 | mean tail mass | top-1 agreement |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['top_k']} | {r['bytes_per_token']} | {r['kl_t1']:.4f} | {r['kl_t2']:.4f} | "
            f"{r['tail_mass']:.3f} | {r['top1_agreement']:.4f} |"
        )
    s = result.get("students")
    if s:
        lines += [
            "",
            f"Student GPT-2 2 x 64, 0.5 KL + 0.5 CE, {s['epochs']} epochs over "
            f"{s['train_tokens']} train tokens, seeds {s['seeds']}; held-out perplexity "
            "(mean ± std):",
            "",
            "| teacher signal | perplexity |",
            "| --- | ---: |",
        ]
        for name, values in s["perplexity"].items():
            mean, std = _mean_std(values)
            lines.append(f"| {name} | {mean:.2f} ± {std:.2f} |")
    lines.append(f"\n(wall time {result['wall_s']:.0f} s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = add_mode_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument(
        "--students",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also distil students from the cache and online (default: on in the full run)",
    )
    args = parser.parse_args(argv)
    result = run(mode_of(args), args.threads, args.students)
    write_json(result, args.json)
    print(report(result), file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
