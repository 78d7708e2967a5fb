"""The checks of `make check-docker` that docker-compose 1.29.2 does not make (no docker engine needed).

1. docker/.env.example and docker/docker-compose.yml agree:
   - every variable the compose file reads is written ``${NAME:?message}`` (a secret: compose stops, naming it,
     when it is missing) or ``${NAME:-default}``, never a bare ``${NAME}`` or ``$NAME`` that would be empty;
   - .env.example names every one of them, and none that the compose file does not read;
   - every required variable holds the placeholder ``change-me`` in .env.example, so no real secret is committed.
2. With ``--resolved FILE`` (the output of ``docker-compose config``): that configuration parses with the
   ``compose-spec`` package, a typed parser of today's Compose specification (the Rust crate compose_spec). It is
   stricter than docker-compose 1.29.2's 2021 JSON schema: it knows every field's type and allowed values
   (restart policies, depends_on conditions, device requests), as Docker Compose v2 does.

Exits 1 with one line per problem. Usage:
    python docker/check_compose.py [--compose FILE] [--env-file FILE] [--resolved FILE]
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
PLACEHOLDER = "change-me"
# $$ is compose's escape for a literal $ (a shell variable of a command); anything else after $ is interpolated.
REFERENCE = re.compile(r"\$(\$|\{(?P<braced>[^}]*)\}|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")
BRACED = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?P<form>:\?|:-)(?P<rest>.*)$", re.DOTALL)


def strings(node):
    """Every string of a parsed YAML document, keys included (comments are not part of it)."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from strings(key)
            yield from strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from strings(item)
    elif isinstance(node, str):
        yield node


def compose_variables(compose_file: Path) -> tuple[dict[str, set[str]], list[str]]:
    """{name: forms used (":?" or ":-")} of the compose file, and its problems."""
    used: dict[str, set[str]] = {}
    problems = []
    for text in strings(yaml.safe_load(compose_file.read_text())):
        for match in REFERENCE.finditer(text):
            if match.group(1) == "$":
                continue
            if match.group("bare"):
                name = match.group("bare")
                problems.append(f"{compose_file.name}: ${name} has no :? or :- form; write ${{{name}:-...}}")
                continue
            braced = BRACED.match(match.group("braced"))
            if braced is None:
                problems.append(
                    f"{compose_file.name}: ${{{match.group('braced')}}} has no :? or :- form; "
                    "write ${NAME:?message} for a secret, ${NAME:-default} otherwise"
                )
                continue
            if braced.group("form") == ":?" and not braced.group("rest").strip():
                problems.append(f"{compose_file.name}: ${{{braced.group('name')}:?}} needs a message after :?")
            used.setdefault(braced.group("name"), set()).add(braced.group("form"))
    return used, problems


def env_file_values(env_file: Path) -> dict[str, str]:
    values = {}
    for line in env_file.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


def check_env_example(compose_file: Path, env_file: Path) -> list[str]:
    used, problems = compose_variables(compose_file)
    example = env_file_values(env_file)
    for name in sorted(set(used) - set(example)):
        problems.append(f"{env_file.name} does not name {name}, which {compose_file.name} reads")
    for name in sorted(set(example) - set(used)):
        problems.append(f"{env_file.name} names {name}, which {compose_file.name} does not read")
    for name, forms in sorted(used.items()):
        if ":?" in forms and example.get(name, PLACEHOLDER) != PLACEHOLDER:
            problems.append(f"{env_file.name}: the secret {name} must hold the placeholder {PLACEHOLDER}")
    if not problems:
        secrets = sorted(name for name, forms in used.items() if ":?" in forms)
        print(f"{env_file.name} names all {len(used)} variables of {compose_file.name}; secrets: {', '.join(secrets)}")
    return problems


def check_resolved(resolved_file: Path) -> list[str]:
    from compose_spec import PyCompose

    try:
        compose = PyCompose.from_yaml(resolved_file.read_text())
        compose.validate()
    except ValueError as exc:
        return [f"the resolved configuration does not parse as the Compose specification: {exc}"]
    print(f"compose-spec parses the resolved configuration: {len(compose.service_names())} services")
    return []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compose", type=Path, default=HERE / "docker-compose.yml")
    parser.add_argument("--env-file", type=Path, default=HERE / ".env.example")
    parser.add_argument("--resolved", type=Path, help="output of `docker-compose config` to parse strictly")
    args = parser.parse_args(argv)
    problems = check_env_example(args.compose, args.env_file)
    if args.resolved is not None:
        problems += check_resolved(args.resolved)
    for problem in problems:
        print(f"error: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
