"""Task utilities for the !function test task: lm-eval imports and runs this file."""


def small_sums(dataset):
    """process_docs: only the sums of two numbers below 50."""
    return dataset.filter(lambda doc: all(int(x) < 50 for x in doc["q"].rstrip("=").split("+")))


def question(doc: dict) -> str:
    return doc["q"]
