"""Argument types and options shared by the subcommands."""

from __future__ import annotations

import argparse


def _number_list(kind: type, example: str):
    """An argparse type for comma/space separated numbers of `kind`."""

    def parse(text: str) -> tuple:
        try:
            out = tuple(kind(x) for x in text.replace(",", " ").split())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected numbers like {example}, got {text!r}") from None
        if not out:
            raise argparse.ArgumentTypeError("expected at least one number")
        return out

    return parse


int_list = _number_list(int, "1024,2048")
float_list = _number_list(float, "0.1,0.5")


def add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="alias (smollm2-135m), checkpoint directory, or .gguf file")


def add_no_fingerprint_check(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--no-fingerprint-check", action="store_true", help=f"{what} a policy made for other weights")
