"""sha256 of a file, read in chunks (checkpoint identity, engine-cache integrity)."""
import hashlib


def sha256_file(path, chunk_size=8 * 2**20):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()
