"""The simulator's own WeCom callback crypto (signature, AES-CBC), written independently of
qywx_ray.wecom.crypto so that crypto tests compare two implementations."""

from __future__ import annotations

import base64
import hashlib
import struct

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes


def sim_sign(token: str, timestamp: str, nonce: str, encrypt: str) -> str:
    """WeCom's msg_signature, written independently of qywx_ray.wecom.crypto."""
    joined = "".join(sorted((token, timestamp, nonce, encrypt)))
    return hashlib.sha1(joined.encode("utf-8")).hexdigest()


def sim_encrypt(encoding_aes_key: str, receive_id: str, text: str, random16: bytes) -> str:
    key = base64.b64decode(encoding_aes_key + "=")
    msg = text.encode("utf-8")
    plain = b"".join((random16, len(msg).to_bytes(4, "big"), msg, receive_id.encode()))
    pad = 32 - (len(plain) % 32)
    plain += bytes((pad,)) * pad
    enc = Cipher(algorithms.AES(key), modes.CBC(key[:16])).encryptor()
    return base64.b64encode(enc.update(plain) + enc.finalize()).decode("ascii")


def sim_decrypt(encoding_aes_key: str, encrypt: str) -> tuple[str, str]:
    """→ (message, receive_id); raises ValueError on anything malformed."""
    key = base64.b64decode(encoding_aes_key + "=")
    dec = Cipher(algorithms.AES(key), modes.CBC(key[:16])).decryptor()
    plain = dec.update(base64.b64decode(encrypt)) + dec.finalize()
    pad = plain[-1]
    if not 1 <= pad <= 32:
        raise ValueError("bad padding")
    plain = plain[:-pad]
    (n,) = struct.unpack(">I", plain[16:20])
    return plain[20 : 20 + n].decode("utf-8"), plain[20 + n :].decode("utf-8")
