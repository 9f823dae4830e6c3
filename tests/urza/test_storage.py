import pytest
from django.core.files.base import ContentFile

from urza.storage import AtomicFileSystemStorage

pytestmark = pytest.mark.fast


class ExplodingContent(ContentFile):
    def chunks(self, chunk_size=None):
        yield b"first half"
        raise OSError("disk full")


def test_a_failed_write_leaves_no_file_and_no_partial(tmp_path):
    storage = AtomicFileSystemStorage(location=str(tmp_path))
    with pytest.raises(OSError, match="disk full"):
        storage.save("kernels/ab/abc.pt2", ExplodingContent(b""))
    assert not storage.exists("kernels/ab/abc.pt2")
    assert list((tmp_path / "kernels" / "ab").iterdir()) == []


def test_saving_the_same_name_twice_keeps_one_file(tmp_path):
    storage = AtomicFileSystemStorage(location=str(tmp_path))
    assert storage.save("k/x.pt2", ContentFile(b"abc")) == "k/x.pt2"
    assert storage.save("k/x.pt2", ContentFile(b"abc")) == "k/x.pt2"
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == ["x.pt2"]
    assert storage.open("k/x.pt2").read() == b"abc"
