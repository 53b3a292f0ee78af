"""Signed URLs of `fs` storages: what the processor's storage HTTP listener accepts without an API key.

A URL names one file and one method, and carries its expiry and an HMAC-SHA256 over all of them (and the content
type a PUT must declare), keyed by a key derived with HKDF from the processor's session root keys under its own
label. Any replica sharing those root keys verifies any other's URLs; rotating the root keys (the old one kept
second) keeps the URLs already given working until they expire.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final
from urllib.parse import quote, urlencode

from ductape_processor.adapters.storage.base import SignedUrl, UrlMethod
from ductape_processor.adapters.storage.registry import Signer
from ductape_processor.errors import Unauthenticated
from ductape_processor.reasons import Reason
from ductape_processor.runtime.policies.secrets import derive_key
from ductape_processor.runtime.storage.operations import StorageRef

LINK_KEY_INFO: Final = b"ductape-processor/storage-link/v1"
"""The HKDF info label of the key that signs storage URLs: distinct from every other key derived from the roots."""
PATH_PREFIX: Final = "/files"


@dataclass(frozen=True, slots=True)
class Link:
    """A verified URL: the file, the method, and the content type a PUT must carry ("" for any)."""

    ref: StorageRef
    key: str
    method: UrlMethod
    content_type: str


class StorageLinks:
    """Signs and verifies the URLs of fs storages; `base_url` is set once the listener is bound."""

    def __init__(self, root_keys: Sequence[tuple[str, bytes]]) -> None:
        if not root_keys:
            raise ValueError("at least one root key is needed")
        self._current = root_keys[0][0]
        self._keys = {kid: derive_key(root, LINK_KEY_INFO) for kid, root in root_keys}
        self.base_url = ""

    def signer(self, ref: StorageRef) -> Signer:
        """The signer of one storage environment's URLs (what its fs adapter calls)."""

        def sign(key: str, method: UrlMethod, expires_s: int, content_type: str) -> SignedUrl:
            return self.sign(ref, key, method, int(time.time()) + expires_s, content_type)

        return sign

    def _mac(self, kid: str, ref: StorageRef, key: str, method: UrlMethod, expires: int, content_type: str) -> str:
        text = "\n".join((method.value, ref.product, ref.env, ref.tag, key, str(expires), content_type))
        return hmac.new(self._keys[kid], text.encode(), hashlib.sha256).hexdigest()

    def sign(self, ref: StorageRef, key: str, method: UrlMethod, expires: int, content_type: str) -> SignedUrl:
        """The URL of `key` for `method` until the unix time `expires`."""
        query = {"method": method.value, "expires": str(expires), "kid": self._current}
        if content_type:
            query["type"] = content_type
        query["sig"] = self._mac(self._current, ref, key, method, expires, content_type)
        path = "/".join(quote(part, safe="") for part in (ref.product, ref.env, ref.tag))
        url = f"{self.base_url}{PATH_PREFIX}/{path}/{quote(key, safe='/')}?{urlencode(query)}"
        headers = {"Content-Type": content_type} if method is UrlMethod.PUT and content_type else {}
        return SignedUrl(url, headers)

    def verify(self, ref: StorageRef, key: str, method: str, query: Mapping[str, str]) -> Link:
        """The link a request presents, or UNAUTHENTICATED when its signature, method or expiry do not hold."""
        kid = query.get("kid", "")
        secret = self._keys.get(kid)
        given_expiry = query.get("expires", "")
        try:
            signed_method = UrlMethod(query.get("method", ""))
        except ValueError:
            raise _refused("the URL is not a signed storage URL") from None
        if not (given_expiry.isascii() and given_expiry.isdigit()) or len(given_expiry) > 12:  # int() reads '١٢'
            raise _refused("the URL is not a signed storage URL")
        expires = int(given_expiry)
        content_type = query.get("type", "")
        expected = self._mac(kid, ref, key, signed_method, expires, content_type) if secret is not None else ""
        given = query.get("sig", "").encode()  # compare_digest raises TypeError on str that is not ASCII
        if not expected or not hmac.compare_digest(expected.encode(), given):
            raise _refused("the URL's signature does not match")
        if signed_method.value != method:
            raise _refused(f"the URL is signed for {signed_method.value}, not {method}")
        if expires < time.time():
            raise _refused("the URL has expired")
        return Link(ref, key, signed_method, content_type)


def _refused(why: str) -> Unauthenticated:
    return Unauthenticated(f"storage URL refused: {why}", reason=Reason.STORAGE_URL_INVALID)
