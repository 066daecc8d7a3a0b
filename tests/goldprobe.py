"""A gold judge for tests: records every (prompt, response) it is given in $GOLD_LOG, scores by word count."""
import json
import os


def score(prompt, response: str) -> float:
    with open(os.environ["GOLD_LOG"], "a") as f:
        f.write(json.dumps({"prompt": prompt, "response": response}) + "\n")
    return float(len(response.split()))
