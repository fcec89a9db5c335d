// client.webhooks.unwrap() of one delivery batchd made. Env: PAYLOAD, HEADERS (JSON), SECRET.
"use strict";
const OpenAI = require("openai");

async function main() {
  const client = new OpenAI({ apiKey: "unused", webhookSecret: process.env.SECRET });
  const event = await client.webhooks.unwrap(process.env.PAYLOAD, JSON.parse(process.env.HEADERS));
  console.log(JSON.stringify({ type: event.type, id: event.data.id }));
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
