"""``ambientctl completion bash|zsh``: shell completion generated from the parser itself.

As ``istioctl completion``: ``source <(ambientctl completion bash)``. The script is static
(no Python runs per keystroke): every command path (``waypoint list``) maps to the words it
accepts (its subcommands, its flags, a positional's choices), and a flag with choices
(``-o``, ``--log-format``) completes its values; anything else falls back to file names. zsh
loads the same script through its ``bashcompinit``. The walk over the argparse tree
(``command_paths``, ``chosen_parser``) also gives ``main`` the subcommand whose usage a wrong
flag should print.
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Iterator, Sequence

SHELLS = ("bash", "zsh")
FUNCTION = "_ambientctl_complete"


def _subcommands(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    # argparse keeps its subcommands in a private action class; this is the one place that
    # looks at it.
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return None


def chosen_parser(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> argparse.ArgumentParser:
    """The innermost subcommand parser ``args`` went through (``waypoint list``'s)."""
    current = parser
    while (sub := _subcommands(current)) is not None:
        name = getattr(args, sub.dest, None)
        if name not in sub.choices:
            break
        current = sub.choices[name]
    return current


def command_paths(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every command path and its parser, the top level (``()``) first."""
    yield path, parser
    sub = _subcommands(parser)
    if sub is not None:
        for name, child in sub.choices.items():
            yield from command_paths(child, (*path, name))


def _value_choices(action: argparse.Action) -> list[str]:
    """What a flag's value or a positional may be: its choices, or a ``a|b|c`` metavar."""
    if action.choices is not None and not isinstance(action, argparse._SubParsersAction):
        return [str(c) for c in action.choices]
    if isinstance(action.metavar, str) and "|" in action.metavar:
        return action.metavar.split("|")
    return []


def _words(parser: argparse.ArgumentParser) -> list[str]:
    words: list[str] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            words.extend(action.choices)
        elif action.option_strings:
            words.extend(action.option_strings)
        else:
            words.extend(_value_choices(action))
    return words


def _case_key(path: Sequence[str]) -> str:
    return shlex.quote(" ".join(path))


def bash_script(parser: argparse.ArgumentParser, programs: Sequence[str]) -> str:
    paths = list(command_paths(parser))
    descend = "|".join(_case_key(path) for path, _parser in paths if path)
    words_cases = "\n".join(
        f"        {_case_key(path)}) words={shlex.quote(' '.join(_words(p)))} ;;"
        for path, p in paths
    )
    value_cases = "\n".join(
        f"        {_case_key((*path, option))}) words={shlex.quote(' '.join(choices))} ;;"
        for path, p in paths
        for action in p._actions
        if action.option_strings and (choices := _value_choices(action))
        for option in action.option_strings
    )
    takes_value = "|".join(
        _case_key((*path, option))
        for path, p in paths
        for action in p._actions
        if action.option_strings and action.nargs != 0
        for option in action.option_strings
    )
    return f"""# {programs[0]} completion (bash): source <({programs[0]} completion bash)
{FUNCTION}() {{
    local cur=${{COMP_WORDS[COMP_CWORD]}} prev=${{COMP_WORDS[COMP_CWORD-1]}}
    local path="" candidate word words i
    for ((i = 1; i < COMP_CWORD; i++)); do
        word=${{COMP_WORDS[i]}}
        candidate="${{path:+$path }}$word"
        case "$candidate" in
            {descend}) path=$candidate ;;
        esac
    done
    case "${{path:+$path }}$prev" in
{value_cases}
        {takes_value}) COMPREPLY=(); return ;;
        *) case "$path" in
{words_cases}
            *) words="" ;;
           esac ;;
    esac
    COMPREPLY=($(compgen -W "$words" -- "$cur"))
}}
complete -o default -F {FUNCTION} {" ".join(programs)}
"""


def completion_script(
    shell: str, parser: argparse.ArgumentParser, programs: Sequence[str]
) -> str:
    script = bash_script(parser, programs)
    if shell == "zsh":
        return (
            f"# {programs[0]} completion (zsh, through bashcompinit); load it with:\n"
            f"#   source <({programs[0]} completion zsh)\n"
            "autoload -U +X bashcompinit && bashcompinit\n" + script
        )
    return script
