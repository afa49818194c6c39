"""A minimal chat program: python examples/chat.py [MODEL]

MODEL is a .edr file, an HF directory, a .gguf file or a pulled name (default smollm2-135m).
Type a message and press Enter; an empty line or Ctrl-D quits.
"""
import sys

import edgerun


def main() -> None:
    model = edgerun.load(sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m")
    messages = []
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        messages.append({"role": "user", "content": line})
        print("bot> ", end="", flush=True)
        reply = ""
        for piece in model.generate(messages, max_new_tokens=128, temperature=0.7, top_p=0.9, seed=0,
                                    stream=True):
            reply += piece
            print(piece, end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": reply})


if __name__ == "__main__":
    main()
