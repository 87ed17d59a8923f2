"""Greedy answers of a trained checkpoint to fixed questions (``--transcripts``): the model card's transcripts,
and a count of how many unseen out-of-scope questions get the scope sentence. Fixed questions, so two
checkpoints can be compared answer for answer."""
from __future__ import annotations

import torch

from tools.train_tiny.checkpoint import load_shipped

TRANSCRIPT_QUESTIONS = ["What does the built-in function len do?", "What does the built-in function zip() do?",
                        "What is the `zip` builtin?",
                        "Explain the `with` statement.", "What is the os.path module for?",
                        "What does the built-in function sorted do?"]
# Outside the documentation (the first two are the app's general examples; none is a training question).
SCOPE_QUESTIONS = ["Hello there", "Write a short poem about a GPU that is running out of memory.",
                   "What is the capital of Italy?", "Good morning! What can you tell me?"]
# Twenty more questions outside the documentation, none of them in training: --transcripts counts how many get
# the scope sentence.
SCOPE_PROBES = ["Hi, nice to see you!", "Good night", "Hey, what's up?", "Who made you?", "Can you speak German?",
                "What is the capital of Italy?", "Who is the president of France?", "Tell me a joke.",
                "What's the weather today?", "Write me a song about summer.", "How tall is Mount Everest?",
                "What is 12 times 7?", "Explain quantum computing.", "Recommend a podcast.", "How do I fix my bike?",
                "What is the best pizza topping?", "Summarize the plot of Hamlet.", "Who painted the Mona Lisa?",
                "Write a haiku about rain.", "What should I eat for dinner?"]


@torch.no_grad()
def generate_answer(model, tok, question: str, max_new_tokens: int = 160) -> tuple[str, list[int], list[int]]:
    prompt = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=True)["input_ids"]
    out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.eos_token_id)
    new = out[0, len(prompt):].tolist()
    return tok.decode(new, skip_special_tokens=True), prompt, new


# Two-turn chats for --transcripts: the second question is asked after the model's own first answer.
TRANSCRIPT_CHATS = [["What does len do?", "What does sorted do?"],
                    ["What is the `zip` builtin?", "Explain the `with` statement."],
                    ["What does str.split do?", "What does the built-in function enumerate do?"]]


@torch.no_grad()
def generate_chat(model, tok, questions: list[str], max_new_tokens: int = 160) -> list[str]:
    """Greedy answers to ``questions`` asked one after the other in one chat (each answer stays in the history)."""
    msgs: list[dict] = []
    answers = []
    for q in questions:
        msgs.append({"role": "user", "content": q})
        prompt = tok.apply_chat_template(msgs, tokenize=True)["input_ids"]
        out = model.generate(input_ids=torch.tensor([prompt]),
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.eos_token_id)
        text = tok.decode(out[0, len(prompt):].tolist(), skip_special_tokens=True)
        answers.append(text)
        msgs.append({"role": "assistant", "content": text})
    return answers


def transcripts(args) -> None:
    torch.set_num_threads(args.threads)
    model, tok = load_shipped(args.out)
    for q in TRANSCRIPT_QUESTIONS:
        text, _, _ = generate_answer(model, tok, q)
        print(f"### User\n{q}\n\n### Assistant\n{text}\n")
    for qs in TRANSCRIPT_CHATS:
        print("---- two-turn chat\n")
        for q, text in zip(qs, generate_chat(model, tok, qs)):
            print(f"### User\n{q}\n\n### Assistant\n{text}\n")
    print("---- outside the documentation\n")
    for q in SCOPE_QUESTIONS:
        text, _, _ = generate_answer(model, tok, q)
        print(f"### User\n{q}\n\n### Assistant\n{text}\n")
    missed = [q for q in SCOPE_PROBES if not _says_scope(generate_answer(model, tok, q, max_new_tokens=60)[0])]
    print(f"---- {len(SCOPE_PROBES) - len(missed)} of {len(SCOPE_PROBES)} unseen out-of-scope questions get the "
          f"scope sentence; not: {missed}\n")


def _says_scope(answer: str) -> bool:
    return "demo model" in answer and "Python" in answer
