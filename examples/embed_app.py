"""Embedding edgerun in an application: load once, answer many calls.

    python examples/embed_app.py [--model MODEL] "question one" "question two" ...

`Assistant` is the part an app keeps: the model is loaded (memory-mapped) once in
the constructor, and each `ask` is a short greedy generation with the chat template.
"""
import sys
import time

import edgerun


class Assistant:
    def __init__(self, model: str = "smollm2-135m", system: str = "Answer in one short sentence."):
        self.model = edgerun.load(model)
        self.system = system

    def ask(self, question: str, max_new_tokens: int = 48) -> str:
        messages = [{"role": "system", "content": self.system}, {"role": "user", "content": question}]
        return self.model.generate(messages, max_new_tokens=max_new_tokens, temperature=0.0).strip()


def main() -> None:
    args, model = sys.argv[1:], "smollm2-135m"
    if args[:1] == ["--model"]:
        model, args = args[1], args[2:]
    questions = args or ["What is the capital of France?", "Name a primary colour."]
    t0 = time.perf_counter()
    bot = Assistant(model)
    print(f"loaded in {time.perf_counter() - t0:.2f} s")
    for q in questions:
        t0 = time.perf_counter()
        answer = bot.ask(q)
        print(f"Q: {q}\nA: {answer}  ({time.perf_counter() - t0:.2f} s)")


if __name__ == "__main__":
    main()
