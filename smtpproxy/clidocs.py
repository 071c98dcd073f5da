"""The man page and the bash completion, generated from the argparse definitions.

``python -m smtpproxy.clidocs man > contrib/smtpproxy.1`` and
``python -m smtpproxy.clidocs bash > contrib/smtpproxy.bash-completion``. A test
compares both files with a fresh generation, so neither can drift from the CLI.
Walking argparse's actions reads a few of its underscore attributes
(``_actions``, ``_choices_actions``): stable since Python 3.2, and checked by
that test on every run.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from smtpproxy import __version__
from smtpproxy.cli import build_parser

# Options whose value is a path: the completion offers file names after them.
PATH_OPTIONS = frozenset({"--config", "-c", "--folder"})


@dataclass(frozen=True, slots=True)
class Command:
    """One (sub)command: its words after ``smtpproxy``, help, options and positionals."""

    words: tuple[str, ...]
    help: str
    options: tuple[argparse.Action, ...]
    positionals: tuple[argparse.Action, ...]
    children: tuple[str, ...]


def commands(
    parser: argparse.ArgumentParser, words: tuple[str, ...] = (), text: str = ""
) -> Iterator[Command]:
    """Every command of ``parser``, depth first, the root first."""
    options = tuple(a for a in parser._actions if a.option_strings)
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    positionals = tuple(a for a in parser._actions if not a.option_strings and a not in subs)
    children: list[tuple[str, argparse.ArgumentParser, str]] = []
    for sub in subs:
        helps = {c.dest: c.help or "" for c in sub._choices_actions}
        children += [(name, p, helps.get(name, "")) for name, p in sub.choices.items()]
    yield Command(
        words, text or (parser.description or ""), options, positionals, tuple(c[0] for c in children)
    )
    for name, child, child_help in children:
        yield from commands(child, (*words, name), child_help)


def _roff(text: str) -> str:
    return text.replace("\\", "\\e").replace("-", "\\-").replace("'", "\\(aq")


def _option_text(action: argparse.Action) -> str:
    names = ", ".join(action.option_strings)
    metavar = action.metavar if isinstance(action.metavar, str) else action.dest
    return names + (f" {metavar.upper()}" if action.nargs != 0 else "")


def _synopsis(action: argparse.Action) -> str:
    """``--config CONFIG``: the first (long) spelling only."""
    metavar = action.metavar if isinstance(action.metavar, str) else action.dest
    return action.option_strings[0] + (f" {metavar.upper()}" if action.nargs != 0 else "")


def man_page() -> str:
    """``smtpproxy.1`` in roff."""
    root, *rest = list(commands(build_parser()))
    out = [
        f'.TH SMTPPROXY 1 "" "smtpproxy {__version__}" "User Commands"',
        ".SH NAME",
        "smtpproxy \\- an inbound SMTP filtering proxy",
        ".SH SYNOPSIS",
        ".B smtpproxy",
        "[\\-\\-version] COMMAND [OPTIONS]",
        ".SH DESCRIPTION",
        "An inbound SMTP proxy in front of an existing mail server: connection policy, SPF, DKIM,",
        "DMARC, the operator's rules and rate limits; clean mail goes to the backend, which must",
        "accept a message before the client is told 250.",
        ".SH OPTIONS",
    ]
    for action in root.options:
        out += [".TP", f".B {_roff(_option_text(action))}", _roff(action.help or "")]
    out.append(".SH COMMANDS")
    for cmd in rest:
        args = " ".join(f"[{_synopsis(a)}]" for a in cmd.options if a.dest != "help")
        if cmd.children:
            args = (args + " " + "|".join(cmd.children)).strip()
        args = (args + " " + " ".join(a.dest.upper() for a in cmd.positionals)).strip()
        out += [".TP", f".B smtpproxy {' '.join(cmd.words)}", _roff(args), ".br", _roff(cmd.help)]
        for action in (*cmd.positionals, *(a for a in cmd.options if a.dest != "help")):
            label = action.dest.upper() if not action.option_strings else _option_text(action)
            out += [".RS", ".TP", f".I {_roff(label)}", _roff(action.help or ""), ".RE"]
    out += [
        ".SH EXIT STATUS",
        "0 success; 1 a test, check or request failed; 2 the configuration or rules are invalid",
        "(the message names the file, key or line).",
        ".SH SIGNALS",
        "SIGTERM and SIGINT drain transactions in flight (up to shutdown_grace) and exit 0;",
        "SIGHUP reloads the rules and the TLS certificate.",
        ".SH FILES",
        ".TP",
        ".I /etc/smtpproxy/smtpproxy.yaml",
        "the configuration (write a commented one with smtpproxy init /etc/smtpproxy)",
        ".TP",
        ".I /var/lib/smtpproxy",
        "the default maildir and the quarantine under the systemd unit",
        ".SH SEE ALSO",
        "The README of the package; smtpproxy rules path prints the packaged rules folder,",
        "whose README.md teaches the rule language.",
    ]
    return "\n".join(out) + "\n"


def key(cmd: Command) -> str:
    """The completion's key of a command: its words from "smtpproxy" on (bash refuses an empty key)."""
    return " ".join(("smtpproxy", *cmd.words))


def bash_completion() -> str:
    """A bash completion script: commands, subcommands, options, file names after path options."""
    cmds = list(commands(build_parser()))
    children = "\n".join(f'    ["{key(c)}"]="{" ".join(c.children)}"' for c in cmds)
    options = "\n".join(
        f'    ["{key(c)}"]="{" ".join(s for a in c.options for s in a.option_strings)}"' for c in cmds
    )
    takes_files = "\n".join(f'    ["{key(c)}"]=1' for c in cmds if c.positionals)
    return f"""# bash completion for smtpproxy (generated by python -m smtpproxy.clidocs bash)
declare -gA _smtpproxy_children=(
{children}
)
declare -gA _smtpproxy_options=(
{options}
)
declare -gA _smtpproxy_files=(
{takes_files}
)

_smtpproxy() {{
    local cur=${{COMP_WORDS[COMP_CWORD]}} prev=${{COMP_WORDS[COMP_CWORD-1]}} path=smtpproxy word i
    for ((i = 1; i < COMP_CWORD; i++)); do
        word=${{COMP_WORDS[i]}}
        case " ${{_smtpproxy_children[$path]}} " in
            *" $word "*) path="$path $word" ;;
        esac
    done
    case "$prev" in
        {"|".join(sorted(PATH_OPTIONS))})
            COMPREPLY=($(compgen -f -- "$cur"))
            return
            ;;
    esac
    if [[ $cur == -* ]]; then
        COMPREPLY=($(compgen -W "${{_smtpproxy_options[$path]}}" -- "$cur"))
    elif [[ -n ${{_smtpproxy_children[$path]}} ]]; then
        COMPREPLY=($(compgen -W "${{_smtpproxy_children[$path]}}" -- "$cur"))
    elif [[ -n ${{_smtpproxy_files[$path]}} ]]; then
        COMPREPLY=($(compgen -f -- "$cur"))
    fi
}}
complete -o filenames -F _smtpproxy smtpproxy
"""


def main(argv: list[str]) -> int:
    """``man`` or ``bash``: print the generated file."""
    if argv == ["man"]:
        sys.stdout.write(man_page())
        return 0
    if argv == ["bash"]:
        sys.stdout.write(bash_completion())
        return 0
    print("usage: python -m smtpproxy.clidocs man|bash", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
