// The fast path's command-line parser (commands/_fast.ts). It applies oclif's rules (its
// parser/parse.js and validate.js) to the flags in commands/_spec.ts, so that a command line
// means the same, and fails the same way (SNAP_USAGE, exit 2), whichever path parses it:
// - `--name VALUE` or `--name=VALUE`; a string flag at most once; its value is missing when
//   there is none or when it is one of the command's flags (`--to --force`);
// - a boolean flag takes no value and may be repeated (`--force=x` leaves `x` an argument);
// - `--` ends the flags; anything else starting with `-` (but `-` and negative numbers) and
//   not a flag is an unknown flag;
// - a flag's one-letter alias (`-q`); an integer flag's value within its bounds;
// - exactly one IMAGE; option values from the list; no two exclusive flags together; required
//   flags given, and the flags a flag depends on.
import { SnapError } from '../src/errors.js'
import type { CommandSpec, FlagSpec, ParsedFlags } from './_spec.js'

const usage = (message: string): SnapError => new SnapError('SNAP_USAGE', `${message} (see --help)`)

/** An integer flag's value, as oclif's Flags.integer checks it (digits, then the bounds). */
function integer(name: string, f: FlagSpec, value: string): number {
  if (!/^-?\d+$/.test(value)) throw usage(`Parsing --${name} ${value}: Expected an integer but received: ${value}`)
  const n = Number(value)
  if (f.min !== undefined && n < f.min) throw usage(`Parsing --${name} ${value}: Expected an integer greater than or equal to ${f.min} but received: ${value}`)
  if (f.max !== undefined && n > f.max) throw usage(`Parsing --${name} ${value}: Expected an integer less than or equal to ${f.max} but received: ${value}`)
  return n
}

export function parseCommandLine(spec: CommandSpec, args: string[]): { image: string; flags: ParsedFlags } {
  const queue = [...args]
  const flags: ParsedFlags = {}
  const positionals: string[] = []
  const unknown: string[] = []
  const chars = new Map(Object.entries(spec.flags).filter(([, f]) => f.char !== undefined).map(([name, f]) => [`-${f.char}`, name]))
  const flagName = (arg: string): string | undefined => (arg.startsWith('--') && Object.hasOwn(spec.flags, arg.slice(2)) ? arg.slice(2) : chars.get(arg))

  const parseFlag = (arg: string): boolean => {
    const name = flagName(arg)
    if (name === undefined) {
      const i = arg.indexOf('=')
      if (i === -1) return false
      queue.unshift(arg.slice(i + 1))
      const parsed = parseFlag(arg.slice(0, i))
      if (!parsed) queue.shift()
      return parsed
    }
    const f = spec.flags[name]
    if (f.type === 'boolean') {
      flags[name] = true
      return true
    }
    if (flags[name] !== undefined) throw usage(`Flag --${name} can only be specified once`)
    const value = queue.shift()
    if (value === undefined || flagName(value) !== undefined) {
      throw usage(f.options ? `Flag --${name} expects one of these values: ${f.options.join(', ')}` : `Flag --${name} expects a value`)
    }
    flags[name] = f.type === 'integer' ? integer(name, f, value) : value
    return true
  }

  let parsingFlags = true
  while (queue.length > 0) {
    const arg = queue.shift()!
    if (parsingFlags && arg.startsWith('-') && arg !== '-') {
      if (arg === '--') {
        parsingFlags = false
        continue
      }
      if (parseFlag(arg)) continue
      if (!/^-\d/.test(arg)) {
        unknown.push(arg)
        continue
      }
    }
    positionals.push(arg)
  }

  for (const [name, v] of Object.entries(flags)) {
    const f = spec.flags[name]
    if (f.options && !f.options.includes(v as string)) throw usage(`Expected --${name}=${v} to be one of: ${f.options.join(', ')}`)
  }
  if (unknown.length > 0) throw usage(`Nonexistent flag${unknown.length > 1 ? 's' : ''}: ${unknown.join(', ')}`)
  if (positionals.length > 1) throw usage(`Unexpected argument${positionals.length > 2 ? 's' : ''}: ${positionals.slice(1).join(', ')}`)
  if (positionals.length === 0) throw usage(`Missing 1 required arg: image (${spec.image})`)
  for (const [name, f] of Object.entries(spec.flags)) {
    if (flags[name] === undefined) {
      if (f.required) throw usage(`Missing required flag ${name}`)
      continue
    }
    const other = f.exclusive?.find((o) => flags[o] !== undefined)
    if (other !== undefined) throw usage(`--${name} cannot also be provided when using --${other}`)
    const missing = f.dependsOn?.filter((o) => flags[o] === undefined) ?? []
    if (missing.length > 0) throw usage(`All of the following must be provided when using --${name}: ${missing.map((o) => `--${o}`).join(', ')}`)
  }
  for (const [name, f] of Object.entries(spec.flags)) if (flags[name] === undefined && f.default !== undefined) flags[name] = f.default
  return { image: positionals[0], flags }
}
