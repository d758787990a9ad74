"""`transplant generate PROMPT`: send one prompt (or chat message) to a running server
over gRPC and print the reply as it streams; stderr says which generation computed it."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("generate", help="send a prompt to a running server and print the reply",
                       allow_abbrev=False)
    p.add_argument("prompt", help="the prompt text ('-' reads it from stdin)")
    p.add_argument("--chat", action="store_true",
                   help="send it as a user chat message, rendered with the model's chat template")
    p.add_argument("--system", default="", help="a system message before it (implies --chat)")
    p.add_argument("--model", default="", help="pin a generation: NAME@N (default: the live generation)")
    p.add_argument("--generation", type=int, help="pin generation N (same as --model NAME@N)")
    p.add_argument("--max-tokens", type=int, default=0, help="new tokens at most (default: the server's default)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=0.0, help="nucleus sampling mass (0 or 1 = off)")
    p.add_argument("--seed", type=int, help="sampling seed")
    p.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable)")
    p.add_argument("--address", default="127.0.0.1:50051", help="server HOST:PORT (default 127.0.0.1:50051)")
    p.add_argument("--inference-key-file", help="file with the inference API key, if the server requires one")
    p.add_argument("--tls-ca", help="CA certificate: connect with TLS")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds (default 300)")
    p.add_argument("--json", action="store_true", help="print one JSON document (text, generation, tokens) at the end")
    p.set_defaults(fn=cmd_generate)


def _request(args):
    from ..rpc import inference_pb2 as I

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    req = I.GenerateRequest(max_new_tokens=max(args.max_tokens, 0), temperature=args.temperature, top_p=args.top_p,
                            stop=args.stop, model=args.model)
    if args.chat or args.system:
        if args.system:
            req.messages.append(I.ChatMessage(role="system", content=args.system))
        req.messages.append(I.ChatMessage(role="user", content=prompt))
    else:
        req.prompt = prompt
    if args.seed is not None:
        req.seed = args.seed
    if args.generation is not None:
        req.generation = args.generation
    return req


def cmd_generate(args) -> int:
    import grpc

    from ..rpc import inference_pb2 as I
    from ..rpc import inference_pb2_grpc

    channel = (grpc.secure_channel(args.address, grpc.ssl_channel_credentials(Path(args.tls_ca).read_bytes()))
               if args.tls_ca else grpc.insecure_channel(args.address))
    md = [("authorization", f"Bearer {Path(args.inference_key_file).read_text().strip()}")] \
        if args.inference_key_file else []
    stub = inference_pb2_grpc.InferenceStub(channel)
    text, last = [], None
    for chunk in stub.GenerateStream(_request(args), metadata=md, timeout=args.timeout):
        text.append(chunk.text)
        last = chunk
        if not args.json and chunk.text:
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
    finish = I.FinishReason.Name(last.finish_reason).removeprefix("FINISH_REASON_").lower()
    if args.json:
        sys.stdout.write(json.dumps({"text": "".join(text), "generation": last.generation, "finish_reason": finish,
                                     "prompt_tokens": last.prompt_tokens,
                                     "completion_tokens": last.completion_tokens}) + "\n")
    else:
        sys.stdout.write("\n")
        print(f"[generation {last.generation}, {last.completion_tokens} tokens, finish: {finish}]", file=sys.stderr)
    channel.close()
    return 0
