// The exec: hot path: `snapctl create|load IMAGE [flags]` parsed with node:util's parseArgs
// from the same flag specs oclif uses, without loading oclif. Anything else (help, other
// commands, a flag the spec does not know) goes to oclif, which explains it properly.
import { parseArgs } from 'node:util'
import { runCreate, runLoad } from './actions.js'
import { runCommand } from './run-command.js'
import { recordResourceUsage } from './size.js'
import { CREATE, LOAD, type CommandSpec, type ParsedFlags } from './spec.js'

const COMMANDS: Record<string, [CommandSpec, (image: string, flags: ParsedFlags) => Promise<number>, boolean]> = {
  create: [CREATE, runCreate, true],
  load: [LOAD, runLoad, false],
}

/** Runs the command and returns true, or returns false when oclif should handle argv. */
export async function fastRun(argv: string[]): Promise<boolean> {
  const entry = COMMANDS[argv[0]]
  if (!entry || argv.some((a) => a === '--help' || a === '-h')) return false
  const [spec, action, jsonErrors] = entry
  let parsed: { values: ParsedFlags; positionals: string[] }
  try {
    const options = Object.fromEntries(Object.entries(spec.flags).map(([name, f]) => [name, { type: f.type }]))
    parsed = parseArgs({ args: argv.slice(1), options, allowPositionals: true, strict: true }) as typeof parsed
  } catch {
    return false
  }
  if (parsed.positionals.length !== 1 || !flagsValid(spec, parsed.values)) return false
  recordResourceUsage()
  const values = { ...defaults(spec), ...parsed.values }
  await runCommand(argv, () => action(parsed.positionals[0], values), { jsonErrors })
  return true
}

function flagsValid(spec: CommandSpec, values: ParsedFlags): boolean {
  for (const [name, v] of Object.entries(values)) {
    const f = spec.flags[name]
    if (f.options && !f.options.includes(v as string)) return false
    if (f.exclusive?.some((other) => values[other] !== undefined)) return false
  }
  return true
}

function defaults(spec: CommandSpec): ParsedFlags {
  return Object.fromEntries(Object.entries(spec.flags).filter(([, f]) => f.default !== undefined).map(([n, f]) => [n, f.default]))
}
