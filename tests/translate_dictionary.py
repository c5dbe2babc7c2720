"""A `command` translation backend for the tests: a dictionary from English captions to Chinese.

Reads JSONL {"id", "text"} on stdin, writes JSONL {"id", "text"} on stdout for each caption it
knows and leaves the others out (the stage rejects those rows). Each run appends the number of
captions it was sent to the counter file given as its first argument, so a test counts calls.
`--fail` exits 3 after a line on stderr; `--garbage` writes a line that is not JSON.
"""

import json
import sys

DICTIONARY = {
    "a red square": "一个红色的方形图案",
    "a green circle": "一个绿色的圆形图案",
    "a blue triangle": "一个蓝色的三角形图案",
    "a yellow square": "一个黄色的方形图案",
}


def main() -> int:
    counter, flags = sys.argv[1], sys.argv[2:]
    records = [json.loads(line) for line in sys.stdin if line.strip()]
    with open(counter, "a", encoding="utf-8") as stream:
        stream.write(f"{len(records)}\n")
    if "--fail" in flags:
        print("loading the dictionary", file=sys.stderr)
        print("dictionary.tsv: no such file", file=sys.stderr)
        return 3
    if "--garbage" in flags:
        print("translated!")
        return 0
    for record in records:
        text = DICTIONARY.get(record["text"])
        if text is not None:
            print(json.dumps({"id": record["id"], "text": text}, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
