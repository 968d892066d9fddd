"""Reading pipeline-config.yml strictly: what YAML would silently accept or crash on is one clear error.

A repeated key (YAML keeps the last one, so a repeated section resets its earlier keys), an unquoted calendar
date, a binary or non-UTF-8 file: each is a ConfigError naming the file, the line and the key path.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import ConfigError


def invalid(source: str, problems: list[str]) -> ConfigError:
    """The one error for a config with problems: a header naming the source, then one line per problem."""
    lines = "\n  ".join(problems)
    return ConfigError(f"{source} is invalid ({len(problems)} problem(s)):\n  {lines}")


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses what YAML would silently accept or crash on in a config.

    A repeated key (YAML keeps the last one, so a repeated section resets its earlier keys) is collected in
    `duplicates` with both line numbers; an unquoted calendar date such as 2021-01-11 (PyYAML turns it into
    a date object, or raises ValueError for 2021-13-45) is a ConfigError naming its line.
    """

    def __init__(self, text: str, source: str, lines: bool = True, prefix: str = "") -> None:
        super().__init__(text)
        self.source = source
        self.lines = lines
        self.root_path = prefix  # the key path of the parsed text (a --set key)
        self.key_paths: dict[int, str] = {}
        self.duplicates: list[str] = []

    def where(self, node: yaml.Node) -> str:
        return f"{self.source} line {node.start_mark.line + 1}" if self.lines else self.source

    def construct_document(self, node: yaml.Node) -> Any:
        self._name(node, self.root_path, set())
        return super().construct_document(node)

    def _name(self, node: yaml.Node, path: str, seen: set[int]) -> None:
        """Remember every node's key path (dataset.seed, dates.0), to name it in messages."""
        if id(node) in seen:  # an alias: named where it was defined
            return
        seen.add(id(node))
        self.key_paths[id(node)] = path
        children: list[tuple[str, yaml.Node]] = []
        if isinstance(node, yaml.MappingNode):
            children = [(str(key.value), value) for key, value in node.value if isinstance(key, yaml.ScalarNode)]
        elif isinstance(node, yaml.SequenceNode):
            children = [(str(index), item) for index, item in enumerate(node.value)]
        for name, child in children:
            self._name(child, f"{path}.{name}" if path else name, seen)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        self._check_duplicates(node)
        return super().construct_mapping(node, deep=deep)

    def _check_duplicates(self, node: yaml.MappingNode) -> None:
        first_line: dict[Any, int] = {}
        parent = self.key_paths.get(id(node), "")
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue  # `<<:` merges may be overridden on purpose
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if key in first_line:
                path = f"{parent}.{key_node.value}" if parent else str(key_node.value)
                what = "section" if isinstance(value_node, yaml.MappingNode) else "key"
                where = f", on lines {first_line[key]} and {line}" if self.lines else ""
                self.duplicates.append(f"{path}: {what} given twice{where}; YAML would keep only the second, "
                                       f"so merge them into one")
            else:
                first_line[key] = line

    def calendar_date(self, node: yaml.ScalarNode) -> Any:
        path = self.key_paths.get(id(node)) or "value"
        try:
            yaml.SafeLoader.construct_yaml_timestamp(self, node)
            problem = "reads as a calendar date"
        except ValueError as exc:
            problem = f"reads as a calendar date but is not a valid one ({exc})"
        raise ConfigError(f"{self.where(node)}: {path}: {node.value} {problem}; write scene dates as date keys "
                          f"like 20210111T102309 (YYYYMMDDTHHMMSS, the sensing time in the product name), and "
                          f"quote other text (\"{node.value}\")")


StrictLoader.add_constructor("tag:yaml.org,2002:timestamp", StrictLoader.calendar_date)


def load_yaml(text: str, source: str, lines: bool = True, prefix: str = "") -> Any:
    """Parse config YAML strictly; every problem is a ConfigError naming `source` (and the line)."""
    try:
        loader = StrictLoader(text, source, lines, prefix)  # checks every character at once
    except yaml.reader.ReaderError as exc:  # a control character: most likely a binary file
        raise ConfigError(f"{source}: not a text file (character #x{exc.character:04x} at position "
                          f"{exc.position}); a config is YAML text like the repository's pipeline-config.yml"
                          ) from None
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark and lines else ""
        problem = getattr(exc, "problem", None) or str(exc).replace("\n", " ")
        raise ConfigError(f"{source}{where}: not valid YAML: {problem}") from None
    finally:
        loader.dispose()
    if loader.duplicates:
        raise invalid(source, loader.duplicates)
    return data


KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
         (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def check_config_file(config_path: Path) -> None:
    """What the path is when it is not a regular file, from os.stat alone: a FIFO is never opened (reading one
    waits for a writer forever), /dev/null is not an empty config, a symlink loop is not "not found". A path
    that does not exist is left to the caller's "not found"; a dangling symlink is named here."""
    try:
        mode = os.stat(config_path).st_mode
    except FileNotFoundError:
        if config_path.is_symlink():
            raise ConfigError(f"config file {config_path} is a symlink to {os.readlink(config_path)}, which does "
                              f"not exist; fix the link or pass the config file itself") from None
        return
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ConfigError(f"config file {config_path} is a symlink loop (it leads back to itself); replace "
                              f"the link with the config file or a link to it") from None
        raise ConfigError(f"cannot read config file {config_path}: {exc.strerror}; check the permissions of "
                          f"its folders or pass another path") from None
    kind = next((name for test, name in KINDS if test(mode)), None)
    if kind is not None:
        raise ConfigError(f"config file {config_path} is {kind}, not a file; snowpipe reads the config from a "
                          f"YAML file such as the repository's pipeline-config.yml: save it to one and pass its "
                          f"path")


def read_config_text(config_path: Path) -> str:
    """The file as text; a binary, non-UTF-8 or unreadable file is one line naming it."""
    try:
        raw = config_path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {config_path}: {exc.strerror}; check its permissions "
                          f"or pass another path") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{config_path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at position {exc.start}); "
                          f"a config is YAML text: save it as UTF-8, or pass the right file") from None
