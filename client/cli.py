"""`swarm generate`: generate text through the swarm, streaming it as it is produced."""

from __future__ import annotations

import argparse
import logging
import sys

from swarm.errors import SwarmError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="swarm generate", description=__doc__)
    p.add_argument("--model", required=True, help="checkpoint folder (config, embeddings/head tensors, tokenizer)")
    p.add_argument("--initial-peers", nargs="+", required=True, help="multiaddrs of a bootstrap node or any peer")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--model-id", help="the model id peers announce (default: the folder's name)")
    p.add_argument("--swarm-key", metavar="FILE", help="a private swarm's key file (from its owner); without it a private swarm refuses you")
    p.add_argument("--transport", choices=["auto", "hivemind", "lite"], default="auto",
                   help="network backend: hivemind (p2pd), lite (py-libp2p, swarm-llm[lite]) or auto (hivemind "
                        "where installed, else lite)")
    p.add_argument("--wait-for-route", type=float, default=30.0, help="seconds to wait for missing blocks")
    p.add_argument("--min-precision", choices=["any", "8bit", "full"], default="any",
                   help="spans a route may use: any (quantized peers too), 8bit (no 4-bit peers) or full "
                        "(unquantized peers only)")
    p.add_argument("--prefer-full-precision", action="store_true",
                   help="route through quantized peers only for blocks no full-precision peer serves")
    p.add_argument("--verify-probability", type=float, default=0.05,
                   help="share of steps whose results a second peer of the same blocks checks (and every "
                        "peer's first step); a peer outvoted is banned and reported; 0 = no checks")
    p.add_argument("--local-blocks", type=_block_counts, default=(0, 0), metavar="FIRST,LAST",
                   help="run the first FIRST and last LAST blocks here: no peer sees the tokens' embeddings or "
                        "the final hidden states (e.g. 1,1)")
    p.add_argument("--speculative", nargs="?", const=True, default=None, type=_draft_tokens, metavar="K",
                   help="speculative decoding: draft up to K tokens (default 8) by prompt lookup and verify "
                        "them in one step through the route; the same tokens as without, fewer round trips "
                        "on repetitive text (code, lists)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _draft_tokens(text: str) -> int:
    try:
        k = int(text)
    except ValueError:
        k = 0
    if not 1 <= k <= 64:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number of draft tokens in [1, 64]")
    return k


def _block_counts(text: str) -> tuple[int, int]:
    try:
        first, last = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected FIRST,LAST block counts, e.g. 1,1") from None
    return first, last


def generate_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    try:
        run_generate(args)
    except SwarmError as e:
        print(f"\nswarm generate: {e}", file=sys.stderr)
        return 1
    return 0


def run_generate(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer, TextStreamer

    from client import ClientConfig, DistributedModelForCausalLM
    from swarm.swarmkey import load_optional

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    config = ClientConfig(
        initial_peers=tuple(args.initial_peers), model_id=args.model_id, wait_for_route_s=args.wait_for_route,
        swarm_key=load_optional(args.swarm_key), min_precision=args.min_precision,
        prefer_full_precision=args.prefer_full_precision, transport=args.transport,
        verify_probability=args.verify_probability,
    )
    model = DistributedModelForCausalLM.from_pretrained(args.model, client_config=config,
                                                        local_blocks=args.local_blocks)
    try:
        inputs = tokenizer(args.prompt, return_tensors="pt")
        sampling = dict(do_sample=True, temperature=args.temperature, top_p=args.top_p) if args.temperature > 0 else {}
        print(args.prompt, end="", flush=True)
        model.generate(
            **inputs, max_new_tokens=args.max_new_tokens, streamer=TextStreamer(tokenizer, skip_prompt=True),
            pad_token_id=tokenizer.pad_token_id, speculative=args.speculative, **sampling,
        )
    finally:
        model.shutdown()
