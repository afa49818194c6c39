"""`edgerun …` subcommands. Bad input prints one line and exits with code 2."""
from __future__ import annotations

import argparse
import json
import sys

from .errors import EdgerunError


def _sampling_args(p):
    g = p.add_argument_group("sampling")
    g.add_argument("-n", "--max-tokens", type=int, default=128, help="tokens to generate (default 128)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repeat-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _model_args(p):
    p.add_argument("model", help="a .edr file, a name from `edgerun pull`, an HF directory or a .gguf file")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--kv-memory", type=_size, default=None, metavar="SIZE",
                   help="KV cache pool, e.g. 512M or 2G (default: one sequence of the full context)")
    p.add_argument("--kv-int8", action="store_true", help="store keys/values as int8 (a scale per token and head)")


def _size(text: str) -> int:
    units = {"k": 2**10, "m": 2**20, "g": 2**30}
    t = text.strip().lower().rstrip("ib")
    try:
        return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512M, 2G)") from None


def _load(a):
    from . import load
    return load(a.model, device=a.device, threads=a.threads, max_kv_bytes=a.kv_memory,
                kv_dtype="int8" if a.kv_int8 else None)


def _gen_kwargs(a):
    return dict(max_new_tokens=a.max_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                min_p=a.min_p, repetition_penalty=a.repeat_penalty, seed=a.seed, stop=a.stop)


def cmd_pull(a):
    from .registry import pull
    print(pull(a.name, force=a.force))


def cmd_convert(a):
    from edgerun.converters import convert
    digest = convert(a.src, a.output, quant=a.quant, group_size=a.group_size, progress=not a.quiet,
                     rules=a.rules, sparsity=a.sparsity, sparsity_pattern=a.sparsity_pattern)
    print(f"wrote {a.output} ({digest[:23]}…)")


def cmd_run(a):
    m = _load(a)
    for piece in m.generate(a.prompt, stream=True, chat=a.chat, **_gen_kwargs(a)):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def cmd_chat(a):
    m = _load(a)
    messages = [{"role": "system", "content": a.system}] if a.system else []
    print("edgerun chat: an empty line or Ctrl-D ends it.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        reply = []
        for piece in m.generate(messages, stream=True, **_gen_kwargs(a)):
            reply.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})


def cmd_inspect(a):
    from .api import open_any
    mf = open_any(a.model, verify=a.verify)
    if a.json:
        print(json.dumps({"path": str(mf.path), "arch": mf.arch, "config": mf.config,
                          "content_hash": mf.content_hash, **mf.extra, "tensors": mf.descriptors}, indent=1))
        return
    total = 0
    print(f"file          {mf.path}")
    print(f"architecture  {mf.arch}")
    print(f"content hash  {mf.content_hash}" + ("  (verified)" if a.verify else ""))
    for k, v in mf.extra.items():
        print(f"{k:<13} {v}")
    c = mf.config
    print(f"config        layers={c.get('num_hidden_layers')} hidden={c.get('hidden_size')} "
          f"heads={c.get('num_attention_heads')}/{c.get('num_key_value_heads')} vocab={c.get('vocab_size')} "
          f"context={c.get('max_position_embeddings')}")
    kinds: dict[str, int] = {}
    print(f"\n{'tensor':<52} {'kind':<6} {'shape':<14} {'params':<14} bytes")
    for name, d in mf.descriptors.items():
        n = int(mf.nbytes(name))
        total += n
        kinds[d["kind"]] = kinds.get(d["kind"], 0) + n
        params = ",".join(f"{k}={v}" for k, v in d.get("params", {}).items())
        print(f"{name:<52} {d['kind']:<6} {'x'.join(map(str, d['shape'])):<14} {params:<14} {n}")
    print(f"\n{len(mf.descriptors)} tensors, {total / 2**20:.1f} MiB: " +
          ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in kinds.items()))


def cmd_perplexity(a):
    from .perplexity import perplexity
    m = _load(a)
    with open(a.file, encoding="utf-8") as f:
        text = f.read()
    r = perplexity(m, text, ctx=a.ctx, max_windows=a.max_windows, progress=True)
    print(json.dumps(r) if a.json else
          f"perplexity {r['perplexity']:.4f} over {r['tokens']} predicted tokens "
          f"({r['windows']} windows of {r['ctx']})")


def cmd_bench(a):
    from .bench import bench, format_report
    r = bench(a.model, threads=a.threads, prompt_tokens=a.prompt_tokens, gen_tokens=a.gen_tokens,
              repeats=a.repeats, cold=a.cold,
              **{k: v for k, v in (("max_kv_bytes", a.kv_memory), ("kv_dtype", "int8" if a.kv_int8 else None))
                 if v is not None})
    print(json.dumps(r, indent=1) if a.json else format_report(r))


def parser() -> argparse.ArgumentParser:
    from edgerun.converters.quant import QUANT_KINDS
    from .registry import MODELS
    p = argparse.ArgumentParser(prog="edgerun", description="On-device LLM inference.")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    s = sub.add_parser("pull", help="fetch a named ready model into the cache")
    s.add_argument("name", help=f"one of: {', '.join(MODELS)}")
    s.add_argument("--force", action="store_true", help="fetch and convert again")
    s.set_defaults(fn=cmd_pull)

    s = sub.add_parser("convert", help="convert an HF directory or a .gguf file to .edr")
    s.add_argument("src")
    s.add_argument("-o", "--output", required=True)
    s.add_argument("--quant", choices=None, default=None, metavar="{" + ",".join(QUANT_KINDS) + "}",
                   help="packed kind for matrices (default: f16 for HF, ternary for BitNet, the native block kinds for GGUF)")
    s.add_argument("--group-size", type=int, default=None,
                   help="int4 group: 32 (default), 64 or 128; binary group: a multiple of 8 (default 128)")
    s.add_argument("--rules", default=None, metavar="PATTERN=KIND,...",
                   help="kinds by tensor name, first match wins; PATTERN is a regular expression searched in "
                        "the name, * matches any: 'embed_tokens|lm_head=int8,*=int4'. With a low-bit --quant "
                        "(ternary, ternary_b3, binary) embeddings and the head stay f16 unless a rule says otherwise")
    s.add_argument("--sparsity", type=float, default=None, metavar="S",
                   help="prune this fraction of each layer matrix's weights by magnitude (0 <= S < 1; 2:4 is 0.5); "
                        "kept weights are stored as int8 with --quant int8, else f16")
    s.add_argument("--sparsity-pattern", default=None, choices=["2:4", "unstructured"],
                   help="2:4 semi-structured (2 kept of every 4 inputs) or unstructured (CSR rows; default with --sparsity)")
    s.add_argument("-q", "--quiet", action="store_true")
    s.set_defaults(fn=cmd_convert)

    s = sub.add_parser("run", help="generate text from a prompt")
    _model_args(s)
    s.add_argument("-p", "--prompt", required=True)
    s.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    _sampling_args(s)
    s.set_defaults(fn=cmd_run)

    s = sub.add_parser("chat", help="interactive chat with the model's chat template")
    _model_args(s)
    s.add_argument("--system", default=None, help="system message")
    _sampling_args(s)
    s.set_defaults(fn=cmd_chat)

    s = sub.add_parser("bench", help="prefill/decode tokens/s, memory, load and JIT time")
    _model_args(s)
    s.add_argument("--prompt-tokens", type=int, default=128)
    s.add_argument("--gen-tokens", type=int, default=64)
    s.add_argument("--repeats", type=int, default=5, help="runs; medians are reported")
    s.add_argument("--cold", action="store_true", help="also time the first token with an empty and a warm "
                   "Numba cache (two extra processes)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_bench)

    s = sub.add_parser("perplexity", help="perplexity of a text file",
                       description="Perplexity over non-overlapping windows of --ctx tokens: each window is "
                                   "scored from an empty state, its first token is not predicted.")
    _model_args(s)
    s.add_argument("--file", required=True, help="UTF-8 text")
    s.add_argument("--ctx", type=int, default=512, help="window length in tokens (default 512)")
    s.add_argument("--max-windows", type=int, default=None, help="score only the first N windows")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_perplexity)

    s = sub.add_parser("inspect", help="header, tensors, packing and sizes of a model")
    s.add_argument("model")
    s.add_argument("--verify", action="store_true", help="recompute the content hash")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_inspect)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        args.fn(args)
    except EdgerunError as e:
        print(f"edgerun: error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"edgerun: error: {e.filename}: no such file", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:          # `edgerun inspect m | head`
        sys.stderr.close()
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
