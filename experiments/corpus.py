"""Build the offline training corpus (general text, code, math, STEM, chat) for a teacher.

    python -m experiments.corpus --teacher smollm2-135m-instruct
    python -m experiments.corpus --teacher smollm2-135m-instruct --corpus.stem_prompts 200 --out data/corpus

The pipeline builds it as its first stage; this command builds it alone and prints where it is and
what it holds (documents, tokens, licence per domain). A second call finds the cached folder.
"""

from __future__ import annotations

import time

from jsonargparse import CLI

from datamodules.corpus import CorpusConfig, build_corpus, read_manifest


def corpus(teacher: str = "smollm2-135m-instruct", corpus: CorpusConfig = CorpusConfig(), out: str | None = None) -> str:
    """
    Args:
        teacher: the teacher whose tokenizer counts tokens and who answers the STEM and chat prompts.
        corpus: sizes of the domains and the teacher's sampling settings.
        out: folder to build into (default: $XDISTILL_CACHE/corpus/<fingerprint>).
    """
    started = time.perf_counter()
    path = build_corpus(teacher, corpus, out)
    manifest = read_manifest(path)
    print(f"corpus: {path} ({time.perf_counter() - started:.0f} s)")
    print(f"{'domain':<8} {'format':<6} {'documents':>9} {'tokens':>9}  licence")
    for domain, info in manifest["domains"].items():
        print(f"{domain:<8} {info['format']:<6} {info['documents']:>9} {info['tokens']:>9}  {info['licence']}")
    return str(path)


if __name__ == "__main__":
    CLI(corpus, as_positional=False)
