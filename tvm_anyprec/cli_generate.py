"""The text verbs of the CLI: `run --prompt` (streamed, with sampling options and --chat), `chat`
(interactive, the KV cache kept across turns) and `serve` (the OpenAI-compatible server)."""
from __future__ import annotations

import sys


def add_sampling_args(p) -> None:
    """llama.cpp's option names (transformers' in the Python API)."""
    g = p.add_argument_group("sampling (llama.cpp's names; default greedy)")
    g.add_argument("--temp", type=float, default=0.0, help="temperature; 0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus: the smallest set with this mass (1: off)")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x the top probability")
    g.add_argument("--repeat-penalty", type=float, default=1.0, help="penalize the last --repeat-last-n tokens")
    g.add_argument("--repeat-last-n", type=int, default=64)
    g.add_argument("--seed", type=int, default=None, help="random seed (same seed, same output)")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def sampling_from(args):
    from .sampling import SamplingParams

    return SamplingParams(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                          repeat_penalty=args.repeat_penalty, repeat_last_n=args.repeat_last_n, seed=args.seed,
                          stop=args.stop or [], max_new_tokens=args.max_new_tokens)


def add_chat_args(p) -> None:
    p.add_argument("--chat", "-cnv", action="store_true", help="apply the tokenizer's chat template (an "
                   "Instruct model answers the prompt instead of continuing it)")
    p.add_argument("--system", help="system prompt (with --chat, and in `chat`)")
    p.add_argument("--no-stream", action="store_true", help="print the text at the end, not as it comes")


def run_text(sess, args) -> int:
    """`run --prompt`: stream the continuation (or, with --chat, the assistant's reply) and a timing line."""
    from .generate import Generation, chat_ids

    params = sampling_from(args)
    tok = sess.tokenizer
    if args.chat:
        msgs = ([{"role": "system", "content": args.system}] if args.system else []) + \
            [{"role": "user", "content": args.prompt}]
        ids = chat_ids(tok, msgs)
    else:
        ids = tok(args.prompt)["input_ids"]
    draft_bits, draft_len = args.draft_bits, args.draft_len
    if draft_bits == "auto":
        from .speculative import plan_speculation
        plan, lat, verify, acc = plan_speculation(sess, args.bits, ids)
        print(f"[speculation plan at {args.bits} bits: step ms " + ", ".join(f"{b}: {t:.1f}" for b, t in
              sorted(lat.items())) + "; verify call ms per draft length " + ", ".join(
              f"{k}: {t:.1f}" for k, t in sorted(verify.items())) + "; acceptance " +
              ", ".join(f"{d}: {a:.0%}" for d, a in sorted(acc.items())) + " -> " +
              (f"drafts of {plan.draft_len} at {plan.draft_bits} bits, expected {plan.speedup:.2f}x]"
               if plan.draft_bits else "plain decoding]"), file=sys.stderr)
        draft_bits, draft_len = plan.draft_bits, plan.draft_len or draft_len
    gen = Generation(sess, ids, params, args.bits, draft_bits, draft_len)
    if not args.chat:
        print(args.prompt, end="", flush=True)
    if args.no_stream:
        print(gen.run(), end="")
    else:
        for piece in gen:
            print(piece, end="", flush=True)
    print()
    extra = ""
    if getattr(gen, "speculative", None):
        st = gen.speculative
        extra = f" | drafts at {draft_bits} bits: {st['accepted']}/{st['drafted']} accepted"
    print(f"[{gen.stats.line()}{extra}; {gen.finish_reason}]", file=sys.stderr)
    return 0


def chat(sess, args) -> int:
    """`chat`: read a line, stream the reply; the conversation's KV cache is reused across turns."""
    from .generate import Conversation

    conv = Conversation(sess, args.system, sampling_from(args), args.bits)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chat with {sess.path.name} at {args.bits} bits (Ctrl-D or /exit to leave)", file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", flush=True, file=sys.stderr)
        line = sys.stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            return 0
        if not line.strip():
            continue
        gen = conv.reply(line.rstrip("\n"))
        for piece in gen:
            print(piece, end="", flush=True)
        print()
        print(f"[{gen.stats.line()}]", file=sys.stderr)


def add_threads_arg(p) -> None:
    p.add_argument("--threads", "-t", type=int, default=None, help="CPU threads of the kernels (default: "
                   "TVM_NUM_THREADS when set, else this machine's physical cores)")


def add_chat_verb(sub) -> None:
    p = sub.add_parser("chat", help="interactive chat with an Instruct model (its chat template; the KV cache "
                       "is reused across turns); reads one user turn per line from stdin")
    p.add_argument("artifact")
    p.add_argument("--bits", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--system", help="system prompt")
    add_threads_arg(p)
    add_sampling_args(p)


def add_serve_verb(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/models, /v1/completions, "
                       "/v1/chat/completions, /health); each request picks its bit-width")
    p.add_argument("artifact")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    add_threads_arg(p)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every /v1 request")
    p.add_argument("--bits", type=int, default=None, help="bit-width of requests that name none (default: the "
                   "highest the artifact serves)")
    p.add_argument("--model-name", help="the model id clients use (default: the artifact directory's name)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting at most; more get 503")


def serve(args) -> int:
    from .serve import run_server

    return run_server(args.artifact, host=args.host, port=args.port, api_key=args.api_key, bits=args.bits,
                      model_name=args.model_name, max_queue=args.max_queue)
