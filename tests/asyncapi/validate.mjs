// Parse AsyncAPI documents with the AsyncAPI project's own parser and print, as
// one JSON object keyed by file, each one's diagnostics and what the parser
// understood (channels, operations, messages, security schemes). Exit 0 when
// every file parsed without an error-severity diagnostic, 1 otherwise.
// Run by tests/helpers/asyncapi.py:  node validate.mjs FILE...
import { readFile } from "node:fs/promises";
import { Parser } from "@asyncapi/parser";

const SEVERITY = ["error", "warning", "information", "hint"];
const ids = (collection) => collection.all().map((item) => item.id()).sort();

async function check(parser, path) {
  const { document, diagnostics } = await parser.parse(await readFile(path, "utf8"));
  const report = {
    diagnostics: diagnostics.map((d) => ({
      severity: SEVERITY[d.severity] ?? String(d.severity),
      code: String(d.code),
      message: d.message,
      path: d.path.join("/"),
    })),
    parsed: document !== undefined,
  };
  if (document === undefined) return report;
  const entries = (collection, describe) =>
    Object.fromEntries(collection.all().map((item) => [item.id(), describe(item)]));
  return {
    ...report,
    version: document.version(),
    channels: entries(document.channels(), (c) => ({
      address: c.address(),
      messages: ids(c.messages()),
      servers: ids(c.servers()),
    })),
    operations: entries(document.operations(), (o) => ({
      action: o.action(),
      channels: ids(o.channels()),
      security: o.security().map((req) =>
        req.all().map((r) => ({
          type: r.scheme().type(),
          scheme: r.scheme().scheme() ?? null,
          bearerFormat: r.scheme().bearerFormat() ?? null,
        })),
      ),
    })),
    messages: entries(document.components().messages(), (m) => ({
      payload: m.hasPayload() ? m.payload().type() : null,
    })),
    securitySchemes: ids(document.components().securitySchemes()),
  };
}

const paths = process.argv.slice(2);
if (paths.length === 0) {
  console.error("usage: node validate.mjs FILE...");
  process.exit(2);
}
const parser = new Parser();
const reports = {};
for (const path of paths) reports[path] = await check(parser, path);
console.log(JSON.stringify(reports, null, 2));
const failed = Object.values(reports).some(
  (r) => !r.parsed || r.diagnostics.some((d) => d.severity === "error"),
);
process.exit(failed ? 1 : 0);
