"""The Python standard library's own source files as a text corpus every machine has.

:data:`STDLIB_FILES` is a fixed list of 287 ``.py`` files of CPython's ``Lib/`` that exist in
every Python from 3.10 to 3.14 (modules removed or turned into packages in that range, such as
``asyncore``, ``pathlib``, ``re`` or ``zipfile``, are left out). They are read from
``sysconfig.get_paths()["stdlib"]`` and split by document into train / val / test with a fixed
rule (a hash of the file name), so the split never depends on the machine.

The files' *contents* differ between Python versions (and patch releases), so the corpus is
identified by the sha256 of its contents together with the Python version: record
:meth:`StdlibCorpus.describe` with any result. Newlines are normalised to ``\\n`` before
hashing, so a checkout with Windows line endings gives the same corpus.

    corpus = load_stdlib_corpus()
    corpus.sha256, corpus.python_version, len(corpus.train), corpus.text("val")[:80]
"""

from __future__ import annotations

import hashlib
import platform
import sysconfig
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SPLITS", "STDLIB_FILES", "Document", "StdlibCorpus", "load_stdlib_corpus", "split_of"]

SPLITS = ("train", "val", "test")

STDLIB_FILES: tuple[str, ...] = (
    "abc.py",
    "argparse.py",
    "ast.py",
    "base64.py",
    "bdb.py",
    "bisect.py",
    "bz2.py",
    "calendar.py",
    "cmd.py",
    "code.py",
    "codecs.py",
    "codeop.py",
    "colorsys.py",
    "compileall.py",
    "configparser.py",
    "contextlib.py",
    "contextvars.py",
    "copy.py",
    "copyreg.py",
    "csv.py",
    "dataclasses.py",
    "datetime.py",
    "difflib.py",
    "dis.py",
    "doctest.py",
    "enum.py",
    "filecmp.py",
    "fileinput.py",
    "fnmatch.py",
    "fractions.py",
    "ftplib.py",
    "functools.py",
    "genericpath.py",
    "getopt.py",
    "getpass.py",
    "gettext.py",
    "glob.py",
    "graphlib.py",
    "gzip.py",
    "hashlib.py",
    "heapq.py",
    "hmac.py",
    "imaplib.py",
    "inspect.py",
    "io.py",
    "ipaddress.py",
    "keyword.py",
    "linecache.py",
    "locale.py",
    "lzma.py",
    "mailbox.py",
    "mimetypes.py",
    "modulefinder.py",
    "netrc.py",
    "ntpath.py",
    "numbers.py",
    "opcode.py",
    "operator.py",
    "optparse.py",
    "os.py",
    "pdb.py",
    "pickle.py",
    "pickletools.py",
    "pkgutil.py",
    "platform.py",
    "plistlib.py",
    "poplib.py",
    "posixpath.py",
    "pprint.py",
    "profile.py",
    "pstats.py",
    "pty.py",
    "py_compile.py",
    "pyclbr.py",
    "queue.py",
    "quopri.py",
    "random.py",
    "reprlib.py",
    "rlcompleter.py",
    "runpy.py",
    "sched.py",
    "secrets.py",
    "selectors.py",
    "shelve.py",
    "shlex.py",
    "shutil.py",
    "signal.py",
    "site.py",
    "smtplib.py",
    "socket.py",
    "socketserver.py",
    "ssl.py",
    "stat.py",
    "statistics.py",
    "string.py",
    "stringprep.py",
    "struct.py",
    "subprocess.py",
    "symtable.py",
    "tabnanny.py",
    "tarfile.py",
    "tempfile.py",
    "textwrap.py",
    "threading.py",
    "timeit.py",
    "token.py",
    "tokenize.py",
    "trace.py",
    "traceback.py",
    "tracemalloc.py",
    "tty.py",
    "types.py",
    "typing.py",
    "uuid.py",
    "warnings.py",
    "wave.py",
    "weakref.py",
    "webbrowser.py",
    "zipapp.py",
    "zipimport.py",
    "asyncio/__init__.py",
    "asyncio/base_events.py",
    "asyncio/base_futures.py",
    "asyncio/base_subprocess.py",
    "asyncio/base_tasks.py",
    "asyncio/constants.py",
    "asyncio/coroutines.py",
    "asyncio/events.py",
    "asyncio/exceptions.py",
    "asyncio/format_helpers.py",
    "asyncio/futures.py",
    "asyncio/locks.py",
    "asyncio/log.py",
    "asyncio/mixins.py",
    "asyncio/proactor_events.py",
    "asyncio/protocols.py",
    "asyncio/queues.py",
    "asyncio/runners.py",
    "asyncio/selector_events.py",
    "asyncio/sslproto.py",
    "asyncio/staggered.py",
    "asyncio/streams.py",
    "asyncio/subprocess.py",
    "asyncio/tasks.py",
    "asyncio/threads.py",
    "asyncio/transports.py",
    "asyncio/trsock.py",
    "asyncio/unix_events.py",
    "asyncio/windows_events.py",
    "asyncio/windows_utils.py",
    "collections/__init__.py",
    "collections/abc.py",
    "concurrent/__init__.py",
    "concurrent/futures/__init__.py",
    "concurrent/futures/_base.py",
    "concurrent/futures/process.py",
    "concurrent/futures/thread.py",
    "ctypes/__init__.py",
    "ctypes/_endian.py",
    "ctypes/util.py",
    "ctypes/wintypes.py",
    "curses/__init__.py",
    "curses/ascii.py",
    "curses/has_key.py",
    "curses/panel.py",
    "curses/textpad.py",
    "dbm/__init__.py",
    "dbm/dumb.py",
    "dbm/gnu.py",
    "dbm/ndbm.py",
    "email/__init__.py",
    "email/_encoded_words.py",
    "email/_header_value_parser.py",
    "email/_parseaddr.py",
    "email/_policybase.py",
    "email/base64mime.py",
    "email/charset.py",
    "email/contentmanager.py",
    "email/encoders.py",
    "email/errors.py",
    "email/feedparser.py",
    "email/generator.py",
    "email/header.py",
    "email/headerregistry.py",
    "email/iterators.py",
    "email/message.py",
    "email/parser.py",
    "email/policy.py",
    "email/quoprimime.py",
    "email/utils.py",
    "email/mime/__init__.py",
    "email/mime/application.py",
    "email/mime/audio.py",
    "email/mime/base.py",
    "email/mime/image.py",
    "email/mime/message.py",
    "email/mime/multipart.py",
    "email/mime/nonmultipart.py",
    "email/mime/text.py",
    "html/__init__.py",
    "html/entities.py",
    "html/parser.py",
    "http/__init__.py",
    "http/client.py",
    "http/cookiejar.py",
    "http/cookies.py",
    "http/server.py",
    "json/__init__.py",
    "json/decoder.py",
    "json/encoder.py",
    "json/scanner.py",
    "json/tool.py",
    "logging/__init__.py",
    "logging/config.py",
    "logging/handlers.py",
    "multiprocessing/__init__.py",
    "multiprocessing/connection.py",
    "multiprocessing/context.py",
    "multiprocessing/forkserver.py",
    "multiprocessing/heap.py",
    "multiprocessing/managers.py",
    "multiprocessing/pool.py",
    "multiprocessing/popen_fork.py",
    "multiprocessing/popen_forkserver.py",
    "multiprocessing/popen_spawn_posix.py",
    "multiprocessing/popen_spawn_win32.py",
    "multiprocessing/process.py",
    "multiprocessing/queues.py",
    "multiprocessing/reduction.py",
    "multiprocessing/resource_sharer.py",
    "multiprocessing/resource_tracker.py",
    "multiprocessing/shared_memory.py",
    "multiprocessing/sharedctypes.py",
    "multiprocessing/spawn.py",
    "multiprocessing/synchronize.py",
    "multiprocessing/util.py",
    "multiprocessing/dummy/__init__.py",
    "multiprocessing/dummy/connection.py",
    "sqlite3/__init__.py",
    "sqlite3/dbapi2.py",
    "sqlite3/dump.py",
    "unittest/__init__.py",
    "unittest/__main__.py",
    "unittest/async_case.py",
    "unittest/case.py",
    "unittest/loader.py",
    "unittest/main.py",
    "unittest/mock.py",
    "unittest/result.py",
    "unittest/runner.py",
    "unittest/signals.py",
    "unittest/suite.py",
    "unittest/util.py",
    "urllib/__init__.py",
    "urllib/error.py",
    "urllib/parse.py",
    "urllib/request.py",
    "urllib/response.py",
    "urllib/robotparser.py",
    "wsgiref/__init__.py",
    "wsgiref/handlers.py",
    "wsgiref/headers.py",
    "wsgiref/simple_server.py",
    "wsgiref/util.py",
    "wsgiref/validate.py",
    "xml/__init__.py",
    "xml/dom/NodeFilter.py",
    "xml/dom/__init__.py",
    "xml/dom/domreg.py",
    "xml/dom/expatbuilder.py",
    "xml/dom/minicompat.py",
    "xml/dom/minidom.py",
    "xml/dom/pulldom.py",
    "xml/dom/xmlbuilder.py",
    "xml/etree/ElementInclude.py",
    "xml/etree/ElementPath.py",
    "xml/etree/ElementTree.py",
    "xml/etree/__init__.py",
    "xml/sax/__init__.py",
    "xml/sax/_exceptions.py",
    "xml/sax/expatreader.py",
    "xml/sax/handler.py",
    "xml/sax/saxutils.py",
    "xml/sax/xmlreader.py",
    "xmlrpc/__init__.py",
    "xmlrpc/client.py",
    "xmlrpc/server.py",
)


def split_of(name: str) -> str:
    """The split of file ``name``: ``val`` or ``test`` for one tenth each, else ``train``.

    A pure function of the name (the first 8 hex digits of its sha256, modulo 10), so adding or
    removing a file never moves another one to another split.
    """
    bucket = int(hashlib.sha256(f"kdkit-stdlib-split:{name}".encode()).hexdigest()[:8], 16) % 10
    return "val" if bucket == 0 else "test" if bucket == 1 else "train"


@dataclass(frozen=True)
class Document:
    """One source file: its path relative to the standard library directory, and its text."""

    name: str
    text: str


@dataclass(frozen=True)
class StdlibCorpus:
    """The documents of each split (in :data:`STDLIB_FILES` order) and what identifies them."""

    train: tuple[Document, ...]
    val: tuple[Document, ...]
    test: tuple[Document, ...]
    sha256: str
    python_version: str
    stdlib_dir: str

    def split(self, name: str) -> tuple[Document, ...]:
        if name not in SPLITS:
            raise ValueError(f"StdlibCorpus: split must be one of {SPLITS}, got {name!r}")
        return getattr(self, name)

    def text(self, split: str) -> str:
        """The documents of ``split`` joined by a blank line."""
        return "\n\n".join(doc.text for doc in self.split(split))

    def describe(self) -> dict:
        """What to record with a result: sha256, Python version, files and characters per split."""
        return {
            "corpus": "python-stdlib-source",
            "sha256": self.sha256,
            "python_version": self.python_version,
            "files": {s: len(self.split(s)) for s in SPLITS},
            "chars": {s: sum(len(d.text) for d in self.split(s)) for s in SPLITS},
            "note": "file contents differ between Python versions; compare results only at "
            "the same sha256",
        }


def load_stdlib_corpus(
    stdlib_dir: str | Path | None = None, files: tuple[str, ...] = STDLIB_FILES
) -> StdlibCorpus:
    """Read ``files`` from ``stdlib_dir`` (default: this Python's standard library).

    Raises FileNotFoundError naming every listed file that is missing (a stripped or split
    Python installation): point ``stdlib_dir`` at a complete CPython ``Lib/`` directory.
    """
    root = Path(stdlib_dir if stdlib_dir is not None else sysconfig.get_paths()["stdlib"])
    missing = [name for name in files if not (root / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"load_stdlib_corpus: {len(missing)} of the {len(files)} listed standard library "
            f"files are missing under {root} (Python {platform.python_version()}): "
            f"{', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}. This installation "
            "lacks part of the standard library (a stripped or split package); pass "
            "stdlib_dir= pointing at a complete CPython Lib/ directory"
        )
    h = hashlib.sha256()
    splits: dict[str, list[Document]] = {s: [] for s in SPLITS}
    for name in files:
        data = (root / name).read_bytes().replace(b"\r\n", b"\n")
        h.update(f"{name}\0{len(data)}\0".encode())
        h.update(data)
        splits[split_of(name)].append(Document(name, data.decode("utf-8")))
    return StdlibCorpus(
        train=tuple(splits["train"]),
        val=tuple(splits["val"]),
        test=tuple(splits["test"]),
        sha256=h.hexdigest(),
        python_version=platform.python_version(),
        stdlib_dir=str(root),
    )
