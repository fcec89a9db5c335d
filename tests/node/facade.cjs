// The official Node SDK (`openai` from npm) against a live batchd facade.
// Env: BASE_URL (…/v1), KEY_A, KEY_B (two tenants). Prints one JSON line; exits 1 on failure.
"use strict";
const assert = require("node:assert/strict");
const crypto = require("node:crypto");
const OpenAI = require("openai");
const { toFile } = OpenAI;

const baseURL = process.env.BASE_URL;
const a = new OpenAI({ baseURL, apiKey: process.env.KEY_A });
const b = new OpenAI({ baseURL, apiKey: process.env.KEY_B });
const TERMINAL = ["completed", "failed", "expired", "cancelled"];

function lines(n, prefix = "req") {
  const out = [];
  for (let i = 0; i < n; i++) {
    const body = { model: "gpt-4o-mini", messages: [{ role: "user", content: `question ${i}` }] };
    out.push(JSON.stringify({ custom_id: `${prefix}-${i}`, method: "POST", url: "/v1/chat/completions", body }));
  }
  return Buffer.from(out.join("\n") + "\n");
}

async function waitEnded(client, id) {
  const deadline = Date.now() + 90_000;
  for (;;) {
    const batch = await client.batches.retrieve(id);
    if (TERMINAL.includes(batch.status)) return batch;
    if (Date.now() > deadline) throw new Error(`${id} did not end: ${batch.status}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

async function upload(client, data, name = "requests.jsonl") {
  return client.files.create({ file: await toFile(data, name), purpose: "batch" });
}

function create(client, fileId, metadata) {
  return client.batches.create({
    input_file_id: fileId,
    endpoint: "/v1/chat/completions",
    completion_window: "24h",
    metadata,
  });
}

async function main() {
  // upload, create, retrieve until done, download
  const f = await upload(a, lines(12));
  assert.equal(f.object, "file");
  let batch = await create(a, f.id, { sdk: "node" });
  assert.equal(batch.status, "validating");
  assert.ok(batch.id.length <= 64 && batch.id.startsWith("batch_"));
  batch = await waitEnded(a, batch.id);
  assert.equal(batch.status, "completed");
  assert.deepEqual(batch.request_counts, { total: 12, completed: 12, failed: 0 });
  const text = await (await a.files.content(batch.output_file_id)).text();
  const ids = text.trim().split("\n").map((l) => JSON.parse(l).custom_id).sort();
  assert.deepEqual(ids, Array.from({ length: 12 }, (_, i) => `req-${i}`).sort());

  // the Uploads API: three parts, with an md5
  const big = lines(3000, "up");
  const up = await a.uploads.create({ bytes: big.length, filename: "big.jsonl", mime_type: "text/jsonl", purpose: "batch" });
  assert.equal(up.status, "pending");
  const partIds = [];
  const size = Math.ceil(big.length / 3);
  for (let off = 0; off < big.length; off += size) {
    const part = await a.uploads.parts.create(up.id, { data: await toFile(big.subarray(off, off + size), "part") });
    partIds.push(part.id);
  }
  const md5 = crypto.createHash("md5").update(big).digest("hex");
  const done = await a.uploads.complete(up.id, { part_ids: partIds, md5 });
  assert.equal(done.status, "completed");
  assert.equal(done.file.bytes, big.length);
  const viaUpload = await waitEnded(a, (await create(a, done.file.id, { sdk: "node-upload" })).id);
  assert.equal(viaUpload.status, "completed");
  assert.equal(viaUpload.request_counts.completed, 3000);

  // cancel right after create
  const c = await create(a, f.id, { sdk: "node-cancel" });
  const cancelling = await a.batches.cancel(c.id);
  assert.ok(["cancelling", "cancelled"].includes(cancelling.status), cancelling.status);
  assert.equal((await waitEnded(a, c.id)).status, "cancelled");

  // auto-paging over more than 100 batches (cheap ones: their input fails validation)
  const bad = await upload(b, Buffer.from("not json\n"), "bad.jsonl");
  const made = [];
  for (let i = 0; i < 105; i += 15) {
    const chunk = await Promise.all(
      Array.from({ length: Math.min(15, 105 - i) }, (_, j) => create(b, bad.id, { i: String(i + j) })),
    );
    made.push(...chunk.map((x) => x.id));
  }
  const seen = [];
  for await (const x of b.batches.list({ limit: 100 })) seen.push(x.id);
  assert.equal(new Set(seen).size, seen.length);
  assert.deepEqual([...seen].sort(), [...made].sort());
  const page = await b.batches.list({ limit: 10 });
  assert.equal(page.data.length, 10);
  assert.equal(page.has_more, true);

  // a tenant sees only its own; an unknown key is a 401
  for (const call of [
    () => b.batches.retrieve(batch.id),
    () => b.batches.cancel(batch.id),
    () => b.files.retrieve(f.id),
    () => b.files.content(batch.output_file_id),
  ]) {
    await assert.rejects(call(), (e) => e.status === 404);
  }
  const theirs = [];
  for await (const x of b.files.list()) theirs.push(x.id);
  assert.ok(!theirs.includes(f.id) && !theirs.includes(batch.output_file_id));
  const stranger = new OpenAI({ baseURL, apiKey: "sk-nobody", maxRetries: 0 });
  await assert.rejects(stranger.batches.list(), (e) => e.status === 401);
  await assert.rejects(a.batches.list({ limit: 101 }), (e) => e.status === 400 && e.code === "integer_above_max_value");

  console.log(JSON.stringify({ ok: true, batch: batch.id, listed: seen.length }));
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
