// The seed's TypeScript example (vision/structure_request), unchanged but for the base URL, the key,
// the model id and where the image comes from. Plain JavaScript: the example has no type annotations.
import OpenAI from "openai";
import { readFileSync } from "node:fs";

const buffer = readFileSync(process.env.IMAGE_PATH);
const base64 = buffer.toString("base64");
const dataUri = `data:image/png;base64,${base64}`;

const client = new OpenAI({
  baseURL: process.env.OCULO_BASE_URL,
  apiKey: process.env.INFERENCE_API_KEY,
});

const completion = await client.chat.completions.create({
  model: process.env.OCULO_MODEL,
  messages: [
    {
      role: "system",
      content: "You are a helpful assistant that can answer questions about the image.",
    },
    {
      role: "user",
      content: [
        {
          type: "image_url",
          image_url: { url: dataUri },
        },
        {
          type: "text",
          text: "What is in this image?",
        },
      ],
    },
  ],
});

console.log(completion.choices[0].message.content);

// Not in the seed: what the test checks.
console.error(JSON.stringify({ usage: completion.usage, id: completion.id }));

const stream = await client.chat.completions.create({
  model: process.env.OCULO_MODEL,
  messages: [{ role: "user", content: [{ type: "image_url", image_url: { url: dataUri } }] }],
  stream: true,
  stream_options: { include_usage: true },
  max_tokens: 4,
});
let chunks = 0;
let usage = null;
for await (const chunk of stream) {
  chunks += 1;
  if (chunk.usage) usage = chunk.usage;
}
console.error(JSON.stringify({ streamChunks: chunks, streamUsage: usage }));
