"""Small file-system helpers: atomic writes (temporary file, fsync, rename) and atomic `save_pretrained`."""

from __future__ import annotations

import logging
import os
import tempfile

logger = logging.getLogger(__name__)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` so that readers see either the old file or the whole new one."""
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# ------------------------------------------------------------------ atomic save_pretrained
_RENAME_EXCHANGE = 2  # linux/fs.h
_STALE_WEIGHT_PREFIXES = ("model", "pytorch_model")
_STALE_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json")


def _exchange_dirs(a: str, b: str) -> bool:
    """Atomically swap two directories with renameat2(RENAME_EXCHANGE) (Linux); False if unsupported."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    return False  # EINVAL / ENOSYS (file system without RENAME_EXCHANGE): use the two-rename fallback


def _is_weight_file(name: str) -> bool:
    return name.startswith(_STALE_WEIGHT_PREFIXES) and name.endswith(_STALE_WEIGHT_SUFFIXES)


def save_pretrained_atomic(model, save_directory: str | os.PathLike, save=None, after_save=None, **kwargs) -> None:
    """`model.save_pretrained(save_directory, **kwargs)` that a crash cannot leave half-written.

    The model is saved into a temporary sibling folder; files of an existing `save_directory` that
    the save does not rewrite (tokenizer, README, trainer files) are hard-linked (or copied) into it,
    except old weight files (as transformers' own clean-up); then the two folders are swapped
    atomically (Linux `renameat2(RENAME_EXCHANGE)`; elsewhere two renames, with a short window in
    which the old folder sits at `.<name>.roste-old-*` next to it) and the old one is deleted. A
    process killed at any moment leaves `save_directory` either entirely old or entirely new (plus
    possibly a hidden `.<name>.roste-tmp-*` sibling, removed by the next save into that folder).

    `save` is the underlying save function (default: the class's `save_pretrained`); `after_save(folder)`
    (optional) completes the saved folder before it is swapped into place. Saves that
    cannot be redirected (non-main processes, `push_to_hub=True`, `distributed_checkpoint=True`)
    are passed through unchanged.
    """
    import shutil

    if save is None:
        save = type(model).save_pretrained.__get__(model)
    if (not kwargs.get("is_main_process", True) or kwargs.get("push_to_hub") or kwargs.get("distributed_checkpoint")
            or os.path.isfile(save_directory)):
        out = save(save_directory, **kwargs)
        if after_save is not None and kwargs.get("is_main_process", True) and os.path.isdir(save_directory):
            after_save(os.fspath(save_directory))
        return out
    target = os.path.abspath(os.fspath(save_directory))
    parent, base = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    for name in sorted(os.listdir(parent)):  # leftovers of killed saves (concurrent saves to one folder: unsupported)
        if name.startswith(f".{base}.roste-old-") and not os.path.exists(target):
            os.rename(os.path.join(parent, name), target)  # killed between the two fallback renames: recover
        elif name.startswith((f".{base}.roste-tmp-", f".{base}.roste-old-")):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
    tmp = tempfile.mkdtemp(prefix=f".{base}.roste-tmp-", dir=parent)
    try:
        save(tmp, **kwargs)
        if after_save is not None:
            after_save(tmp)
        _fsync_tree(tmp)
        if os.path.isdir(target):
            for name in os.listdir(target):
                src, dst = os.path.join(target, name), os.path.join(tmp, name)
                if os.path.lexists(dst) or (os.path.isfile(src) and _is_weight_file(name)):
                    continue
                if os.path.isdir(src) and not os.path.islink(src):
                    shutil.copytree(src, dst, copy_function=_link_or_copy, symlinks=True)
                else:
                    _link_or_copy(src, dst)
        old = None
        try:
            if not os.path.isdir(target):
                os.rename(tmp, target)
            elif _exchange_dirs(tmp, target):
                shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old folder
            else:
                old = tempfile.mkdtemp(prefix=f".{base}.roste-old-", dir=parent)
                os.rmdir(old)
                os.rename(target, old)
                os.rename(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
        except OSError as exc:  # e.g. target is a mount point (EBUSY): save in place, not atomically
            if old is not None and os.path.isdir(old) and not os.path.exists(target):
                os.rename(old, target)  # undo the first of the two renames
            logger.warning("Could not swap %s into place atomically (%s); saving in place instead.", target, exc)
            shutil.rmtree(tmp, ignore_errors=True)
            save(target, **kwargs)
            if after_save is not None:
                after_save(target)
            return None
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _link_or_copy(src: str, dst: str) -> str:
    import shutil

    if os.path.islink(src):
        os.symlink(os.readlink(src), dst)
        return dst
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: str) -> None:
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            if os.path.islink(path):
                continue
            try:
                with open(path, "rb+") as f:
                    os.fsync(f.fileno())
            except OSError:
                pass
        _fsync_dir(folder)


def install_atomic_save(model, after_save=None) -> None:
    """Make `model.save_pretrained` atomic (an instance method; the class is untouched).

    `after_save(folder)` runs on every saved folder before it is swapped into place (the RoSTE quantizer
    passes the load guard of `hf_roste.export.load_guard`).
    """
    import types

    model._roste_after_save = after_save
    if getattr(model.save_pretrained, "__func__", None) is _atomic_save_method:
        return
    model.save_pretrained = types.MethodType(_atomic_save_method, model)


def _atomic_save_method(self, save_directory, *args, **kwargs):
    """`save_pretrained` of RoSTE models: atomic (see `hf_roste.io.save_pretrained_atomic`)."""
    if args:  # positional is_main_process, state_dict, ... as in PreTrainedModel.save_pretrained
        names = ("is_main_process", "state_dict", "push_to_hub", "max_shard_size", "variant", "token")
        kwargs.update(dict(zip(names, args, strict=False)))
    return save_pretrained_atomic(self, save_directory, after_save=getattr(self, "_roste_after_save", None), **kwargs)
