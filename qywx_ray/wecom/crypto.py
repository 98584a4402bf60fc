"""WeCom callback crypto (WXBizMsgCrypt semantics): signature, AES-256-CBC encrypt/decrypt.

signature = SHA-1 of the sorted concatenation of token, timestamp, nonce and ciphertext.
Ciphertext = base64(AES-256-CBC(key, iv=key[:16], PKCS#7 to 32-byte blocks of
16 random bytes + 4-byte big-endian length + message + receive id)).

Never logs or puts a key, token or plaintext into an exception message; every failure
is its own CryptoError subclass so callers (and tests) can tell them apart.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import struct

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from qywx_ray.errors import CryptoError

BLOCK_BYTES = 32  # WeCom pads to 32-byte blocks, not AES's 16
MAX_MESSAGE_BYTES = 1 << 20  # a decrypted callback larger than 1 MiB is malformed


class BadSignatureError(CryptoError):
    """msg_signature does not match token/timestamp/nonce/ciphertext."""


class BadBase64Error(CryptoError):
    """The ciphertext is not valid base64 or not a whole number of AES blocks."""


class BadPaddingError(CryptoError):
    """The decrypted PKCS#7 padding is invalid (wrong key or corrupted ciphertext)."""


class BadLengthError(CryptoError):
    """The 4-byte message length in the plaintext is out of range."""


class ReceiveIdMismatchError(CryptoError):
    """The receive id in the plaintext is not the configured CorpID."""


class BadKeyError(CryptoError):
    """The EncodingAESKey is not 43 base64 characters decoding to 32 bytes."""


def decode_aes_key(encoding_aes_key: str) -> bytes:
    """EncodingAESKey (43 chars) → 32-byte AES key."""
    if len(encoding_aes_key) != 43:
        raise BadKeyError(
            f"EncodingAESKey must be 43 characters, got {len(encoding_aes_key)}; "
            "copy it exactly from the WeCom callback configuration page"
        )
    try:
        key = base64.b64decode(encoding_aes_key + "=", validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadKeyError("EncodingAESKey is not valid base64") from exc
    if len(key) != 32:  # pragma: no cover - 43 valid chars always decode to 32 bytes
        raise BadKeyError(f"EncodingAESKey decodes to {len(key)} bytes, expected 32")
    return key


def pkcs7_pad(data: bytes, block: int = BLOCK_BYTES) -> bytes:
    n = block - len(data) % block
    return data + bytes([n]) * n


def pkcs7_unpad(data: bytes, block: int = BLOCK_BYTES) -> bytes:
    if not data:
        raise BadPaddingError("empty plaintext")
    n = data[-1]
    if n < 1 or n > block or n > len(data):
        raise BadPaddingError("invalid PKCS#7 padding (wrong EncodingAESKey or corrupted data)")
    if not hmac.compare_digest(data[-n:], bytes([n]) * n):
        raise BadPaddingError("invalid PKCS#7 padding (wrong EncodingAESKey or corrupted data)")
    return data[:-n]


class WeComCrypto:
    """Verify, decrypt and encrypt WeCom callbacks for one (token, key, receive id)."""

    def __init__(self, token: str, encoding_aes_key: str, receive_id: str) -> None:
        self._token = token
        self._key = decode_aes_key(encoding_aes_key)
        self._iv = self._key[:16]
        self.receive_id = receive_id
        self._receive_id_bytes = receive_id.encode()

    def __repr__(self) -> str:  # never show the secrets
        return f"WeComCrypto(receive_id={self.receive_id!r})"

    def signature(self, timestamp: str, nonce: str, encrypt: str) -> str:
        parts = sorted([self._token, str(timestamp), str(nonce), encrypt])
        return hashlib.sha1("".join(parts).encode()).hexdigest()

    def verify(self, signature: str, timestamp: str, nonce: str, encrypt: str) -> None:
        """Raise BadSignatureError unless `signature` matches (constant-time compare)."""
        expected = self.signature(timestamp, nonce, encrypt)
        if not hmac.compare_digest(expected.encode(), (signature or "").lower().encode()):
            raise BadSignatureError("msg_signature does not match")

    def decrypt(self, encrypt_b64: str) -> str:
        try:
            raw = base64.b64decode(encrypt_b64, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise BadBase64Error("ciphertext is not valid base64") from exc
        if not raw or len(raw) % 16:
            raise BadBase64Error(f"ciphertext length {len(raw)} is not a multiple of 16 bytes")
        decryptor = Cipher(algorithms.AES(self._key), modes.CBC(self._iv)).decryptor()
        plain = pkcs7_unpad(decryptor.update(raw) + decryptor.finalize())
        if len(plain) < 20:
            raise BadLengthError(f"plaintext of {len(plain)} bytes is shorter than its header")
        (length,) = struct.unpack(">I", plain[16:20])
        if length > MAX_MESSAGE_BYTES:
            raise BadLengthError(
                f"message length {length} exceeds the {MAX_MESSAGE_BYTES}-byte limit"
            )
        if length > len(plain) - 20:
            raise BadLengthError(
                f"message length {length} exceeds the {len(plain) - 20} bytes decrypted"
            )
        message = plain[20 : 20 + length]
        receive_id = plain[20 + length :]
        if not hmac.compare_digest(receive_id, self._receive_id_bytes):
            raise ReceiveIdMismatchError(
                "receive id in the callback does not match the configured CorpID"
            )
        try:
            return message.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadLengthError("decrypted message is not valid UTF-8") from exc

    def encrypt(self, text: str, *, random16: bytes | None = None) -> str:
        prefix = random16 if random16 is not None else os.urandom(16)
        if len(prefix) != 16:
            raise ValueError("random16 must be exactly 16 bytes")
        body = text.encode("utf-8")
        if len(body) > MAX_MESSAGE_BYTES:  # decrypt refuses these: never produce one
            raise BadLengthError(
                f"message length {len(body)} exceeds the {MAX_MESSAGE_BYTES}-byte limit"
            )
        plain = prefix + struct.pack(">I", len(body)) + body + self._receive_id_bytes
        encryptor = Cipher(algorithms.AES(self._key), modes.CBC(self._iv)).encryptor()
        return base64.b64encode(encryptor.update(pkcs7_pad(plain)) + encryptor.finalize()).decode()
