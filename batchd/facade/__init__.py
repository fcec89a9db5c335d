"""The OpenAI-compatible facade: `OpenAI(base_url="http://batchd:PORT/v1", api_key=KEY)`.

Files, Uploads and Batches as OpenAI serves them, for tenants configured in
`[facade.tenants.NAME]`; each batch is one ordinary batchd job (split, held by admission,
resubmitted, collected and kept like any other). `app` has the routes and auth, `files`
and `batches` the handlers, `views` the OpenAI-shaped objects, `stage` the background
work (settling ended batches, webhooks out, expiry), `tenants` the keys.
"""

from batchd.facade.app import Facade, is_facade_path
from batchd.facade.tenants import Tenant, load

__all__ = ["Facade", "Tenant", "is_facade_path", "load"]
