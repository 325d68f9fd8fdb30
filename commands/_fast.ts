// The exec: hot path, and the start of save and restore (a lazy restore's time to a runnable VM
// counts it): `snapctl create|load|restore|save ...` parsed by commands/_argv.ts (oclif's rules, the
// flag specs oclif uses) without loading oclif. Help (`--help`, `-h`) and every other command
// go to oclif. $SNAPCTL_NO_FAST_PATH=1 sends everything to oclif (tests compare both paths).
import { runCreate, runLoad, runRestore, runSave } from './_actions.js'
import { parseCommandLine } from './_argv.js'
import { runCommand } from './_run-command.js'
import { recordResourceUsage } from './_size.js'
import { CREATE, LOAD, RESTORE, SAVE, type CommandSpec, type ParsedFlags } from './_spec.js'

const COMMANDS: Record<string, [CommandSpec, (image: string, flags: ParsedFlags, signal: AbortSignal) => Promise<number>, boolean]> = {
  create: [CREATE, runCreate, true],
  load: [LOAD, runLoad, false],
  restore: [RESTORE, runRestore, true],
  save: [SAVE, runSave, true],
}

/** Runs the command and returns true, or returns false when oclif should handle argv. */
export async function fastRun(argv: string[]): Promise<boolean> {
  const entry = COMMANDS[argv[0]]
  if (!entry || process.env.SNAPCTL_NO_FAST_PATH === '1') return false
  const dashdash = argv.indexOf('--')
  const flagPart = dashdash === -1 ? argv : argv.slice(0, dashdash)
  if (flagPart.some((a) => a === '--help' || a === '-h')) return false
  const [spec, action, jsonErrors] = entry
  recordResourceUsage()
  await runCommand(argv, (signal) => {
    const { image, flags } = parseCommandLine(spec, argv.slice(1))
    return action(image, flags, signal)
  }, { jsonErrors })
  return true
}
