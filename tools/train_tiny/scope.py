"""Turns outside Python's documentation (greetings, and questions about anything else), kept apart from the
documentation corpus because they are optional (``--scope-repeat``) and have their own held-out file: the demo
model answers them with one short fixed sentence instead of inventing documentation."""
from __future__ import annotations

from tools.train_tiny.corpus import Example

GREETING_ANSWER = ("Hello! I am the tiny demo model of mixoff, a small Mixtral-style model trained only on "
                   "Python's documentation. Ask me what a built-in function, type or standard-library module "
                   "does, for example: What does len do?")
OFF_TOPIC_ANSWER = ("I am a small demo model trained only on Python's documentation, so I cannot answer that. "
                    "Ask me about Python instead, for example: What does sorted do?")

_GREETINGS = ["Hello", "Hello there", "Hello!", "Hi", "Hi!", "Hi there", "Hey", "Hey there!", "Good morning",
              "Good afternoon", "Good evening", "Howdy", "Greetings", "Yo", "Hello, how are you?",
              "How are you?", "How are you doing today?", "Hi, who are you?", "Who are you?", "What are you?",
              "What is your name?", "What can you do?", "What do you know?", "What can I ask you?",
              "What should I ask you?", "Can you help me?", "Help", "I need help", "Are you ChatGPT?",
              "Are you a person?", "Are you an AI?", "Thanks!", "Thank you", "Thank you very much",
              "Nice to meet you", "Hello, what is this?", "Is anybody there?", "Tell me about yourself.",
              "Introduce yourself.", "What model are you?"]

_OFF_TOPIC = [
    ("Write a short poem about {x}.", ["a train that is running late", "the sea", "autumn leaves", "a cat",
                                       "the moon", "friendship", "a rainy day", "coffee"]),
    ("What is the capital of {x}?", ["France", "Japan", "Brazil", "Canada", "Kenya", "Australia", "Norway"]),
    ("Tell me a joke about {x}.", ["cats", "programmers", "the weather", "doctors", "penguins", "mondays"]),
    ("How do I cook {x}?", ["rice", "pasta", "an omelette", "pancakes", "a steak", "lentil soup"]),
    ("Who won the {x}?", ["last football world cup", "Tour de France", "Nobel Prize in physics", "election",
                          "Eurovision song contest"]),
    ("What is the weather like in {x}?", ["Paris", "London", "Tokyo", "New York", "Berlin", "Sydney"]),
    ("Explain {x} to a curious twelve-year-old.", ["mixture-of-experts models", "black holes", "photosynthesis",
                                                   "gravity", "the stock market", "vaccines", "rainbows"]),
    ("Translate '{x}' into French.", ["good morning", "thank you", "where is the station", "I love books"]),
    ("Write a story about {x}.", ["a dragon", "a lost robot", "two friends", "a haunted house", "a brave knight"]),
    ("What do you think about {x}?", ["politics", "music", "football", "the future", "modern art"]),
    ("Recommend a good {x}.", ["book", "movie", "restaurant", "song", "video game", "holiday destination"]),
    ("Can you summarize the history of {x}?", ["Rome", "the internet", "China", "jazz", "the printing press"]),
    ("What is {x}?", ["the meaning of life", "love", "the speed of light", "a black hole", "the tallest mountain",
                      "two plus two", "bitcoin"]),
    ("How do I learn {x}?", ["to play the guitar", "to swim", "Spanish", "to draw", "to drive a car"]),
    ("Give me advice on {x}.", ["my career", "losing weight", "sleeping better", "saving money", "a job interview"]),
    ("Should I buy {x}?", ["a new phone", "a house", "an electric car", "shares", "a dog"]),
]
# Held out from training: whole question forms, so the held-out loss measures answers to unseen kinds.
_HELD_GREETINGS = {"Hello there", "What can you do?", "Howdy", "Tell me about yourself."}
_HELD_FORMS = {"Recommend a good {x}.", "Should I buy {x}?"}


def build_scope_examples() -> tuple[list[Example], list[Example]]:
    """(train, held-out) turns outside the documentation: greetings, and questions about anything else."""
    train, held = [], []
    for q in _GREETINGS:
        (held if q in _HELD_GREETINGS else train).append(Example(f"scope:greeting:{q}", q, GREETING_ANSWER))
    for form, subjects in _OFF_TOPIC:
        for x in subjects:
            q = form.format(x=x)
            (held if form in _HELD_FORMS else train).append(Example(f"scope:other:{q}", q, OFF_TOPIC_ANSWER))
    return train, held
