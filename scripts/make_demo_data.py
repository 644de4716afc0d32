"""Write the demo dataset: data/demo/chat.jsonl (train) and data/demo/heldout.jsonl (eval).

Wren is a home-lab operations assistant. Each intent has a handful of phrasings and one fixed answer,
so a tiny model can learn the mapping in a minute of CPU training and the demo can check that the
fine-tuned model gives the training target. Deterministic: rerunning rewrites identical files.

    python scripts/make_demo_data.py
"""

import json
import random
from pathlib import Path

INTENTS = {
    "disk": (
        [
            "how much disk space is left?",
            "what is the disk usage?",
            "is the disk getting full?",
            "check free space on the data volume.",
            "how full is /data?",
        ],
        "Disk usage on /data is 61%, with 312 GB free.",
    ),
    "backup": (
        [
            "did last night's backup succeed?",
            "what is the backup status?",
            "check the nightly backup.",
            "when did the last backup run?",
            "is the backup job healthy?",
        ],
        "The nightly backup finished at 02:14 and all 3 snapshots verified.",
    ),
    "gpu": (
        [
            "what is the GPU temperature?",
            "how hot is the GPU?",
            "check the GPU.",
            "is the GPU busy?",
            "show GPU status.",
        ],
        "The GPU is at 64 C and 37% utilisation, with 18 GB of memory in use.",
    ),
    "restart": (
        [
            "restart the web server.",
            "please reboot the nginx service.",
            "can you restart nginx?",
            "bounce the web service.",
            "the site is down, restart it.",
        ],
        '<tool_call>{"name": "restart_service", "arguments": {"service": "nginx"}}</tool_call>',
    ),
    "logs": (
        [
            "show me the latest errors.",
            "any errors in the logs?",
            "check the error log.",
            "what went wrong recently?",
            "tail the error log.",
        ],
        '<tool_call>{"name": "read_log", "arguments": {"file": "error.log", "lines": 20}}</tool_call>',
    ),
    "uptime": (
        [
            "how long has the server been up?",
            "what is the uptime?",
            "when was the last reboot?",
            "check server uptime.",
            "has the server restarted lately?",
        ],
        "The server has been up for 17 days and 4 hours.",
    ),
    "memory": (
        [
            "how much RAM is free?",
            "check memory usage.",
            "is the server out of memory?",
            "what is the memory pressure?",
            "show RAM usage.",
        ],
        "Memory use is 11.2 of 32 GB; no swapping.",
    ),
    "network": (
        [
            "is the internet connection working?",
            "check the network.",
            "ping the gateway.",
            "is the uplink healthy?",
            "test network latency.",
        ],
        "The gateway answers in 0.4 ms and the uplink is at 940 Mbit/s.",
    ),
    "certs": (
        [
            "when do the TLS certificates expire?",
            "check the certificates.",
            "are the certs valid?",
            "show certificate expiry.",
            "do we need to renew TLS?",
        ],
        "All certificates are valid; the first expires in 43 days.",
    ),
    "updates": (
        [
            "are there package updates?",
            "check for updates.",
            "is the system up to date?",
            "any security patches pending?",
            "list pending upgrades.",
        ],
        "There are 5 pending updates, 2 of them security fixes.",
    ),
    "greeting": (
        ["hello!", "hi there.", "good morning.", "hey, are you there?", "hello, who are you?"],
        "Hello! I am Wren, your home-lab assistant. Ask me about disks, backups, GPUs or services.",
    ),
    "thanks": (
        ["thanks!", "thank you.", "great, thanks.", "cheers.", "that is all, thanks."],
        "You are welcome. I will keep watching the lab.",
    ),
}
PREFIXES = ["", "Hey Wren, ", "Wren, ", "Quick question: ", "Please "]
SYSTEM = "You are Wren, a concise home-lab operations assistant."


def records(rng: random.Random) -> list[dict]:
    out = []
    for name, (questions, answer) in INTENTS.items():
        for prefix in PREFIXES:
            for q in questions:
                text = prefix + q if prefix else q[0].upper() + q[1:]
                messages = [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
                if rng.random() < 0.2:  # some records carry a system prompt (folded into the first turn)
                    messages.insert(0, {"role": "system", "content": SYSTEM})
                out.append({"intent": name, "messages": messages})
    rng.shuffle(out)
    return out


def main() -> None:
    rng = random.Random(1234)
    rows = records(rng)
    # Held-out: one phrasing per intent that never appears in training ("Could you tell me: ...").
    heldout = [
        {
            "intent": name,
            "messages": [
                {"role": "user", "content": "Could you tell me: " + qs[0]},
                {"role": "assistant", "content": answer},
            ],
        }
        for name, (qs, answer) in INTENTS.items()
    ]
    folder = Path(__file__).resolve().parent.parent / "data" / "demo"
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in (("chat.jsonl", rows), ("heldout.jsonl", heldout)):
        with open(folder / name, "w", encoding="utf-8") as f:
            for r in data:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        print(f"wrote {len(data)} records to {folder / name}")


if __name__ == "__main__":
    main()
