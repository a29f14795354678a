"""A client on the lite transport, in a process of its own (tests/test_lite_transport.py, benchmarks).

Run with the lite environment's python (py-libp2p, no hivemind): `python tests/lite_client.py JSON`, JSON
being {"model", "initial_peers", "prompt": [token ids], "new_tokens", "runs": [{"direct": bool}, ...],
"fetch": bool, "pause_at": k or null, "step_timeout_s"}. For each run: one client (ClientConfig(transport=
"lite", direct=...)), its DHT view when "fetch" ({block: {peer id: record}}), one greedy generation. With
"pause_at": k, after token k it prints `ROUTE [peer ids]` and waits for a line on stdin (the test kills
a peer meanwhile). Ends with one line `RESULT {json}`: per run the tokens, the route, the recoveries;
and whether hivemind and py-libp2p were imported.
"""

from __future__ import annotations

import json
import sys
import time


def main(argv: list[str]) -> int:
    args = json.loads(argv[0])
    import torch
    from transformers.generation.streamers import BaseStreamer

    from client import ClientConfig, DistributedModelForCausalLM, loop

    class PauseAt(BaseStreamer):
        """After token `k` (call 1 is the prompt): print the route, wait for the test's go-ahead."""

        def __init__(self, k: int | None, model):
            self.k, self.model, self.calls = k, model, 0

        def put(self, value):
            self.calls += 1
            if self.k is not None and self.calls - 1 == self.k:
                route = [hop.peer_id for hop in self.model.active_session.route]
                print("ROUTE " + json.dumps(route), flush=True)
                sys.stdin.readline()

        def end(self):
            pass

    runs = []
    for run in args["runs"]:
        config = ClientConfig(initial_peers=tuple(args["initial_peers"]), transport="lite",
                              direct=run["direct"], step_timeout_s=args.get("step_timeout_s", 5.0))
        model = DistributedModelForCausalLM.from_pretrained(args["model"], client_config=config)
        result: dict = {"direct": run["direct"]}
        try:
            started = time.monotonic()
            transport = loop.run(model.transport(), 60)
            result["transport"] = type(transport).__name__
            result["join_s"] = time.monotonic() - started
            if args.get("fetch"):
                blocks = loop.run(transport.fetch_blocks(model.model_id, model.num_blocks), 60)
                result["blocks"] = {str(b): {p: r.to_wire() for p, r in found.items()}
                                    for b, found in blocks.items()}
            prompt = torch.tensor([args["prompt"]])
            with model.inference_session(max_length=prompt.shape[1] + args["new_tokens"]) as session:
                out = model.generate(prompt, max_new_tokens=args["new_tokens"], do_sample=False,
                                     pad_token_id=0, eos_token_id=None,
                                     streamer=PauseAt(args.get("pause_at"), model))
                result["route"] = [hop.peer_id for hop in session.route]
                result["recoveries"] = session.recoveries
            result["tokens"] = out[0].tolist()
        finally:
            model.shutdown()
        runs.append(result)
    print("RESULT " + json.dumps({"runs": runs, "hivemind_imported": "hivemind" in sys.modules,
                                  "libp2p_imported": "libp2p" in sys.modules}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
