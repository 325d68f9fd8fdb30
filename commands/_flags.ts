// oclif flags from the plain specs in commands/_spec.ts (the `_` prefix keeps oclif from
// taking this file for a command; see "commandDiscovery" in package.json).
import { Flags, type Interfaces } from '@oclif/core'
import { CACHE_FLAGS, type CommandSpec } from './_spec.js'

// Typed loosely on purpose: the values are checked by the shared action code (commands/_actions.ts).
export function oclifFlags(spec: CommandSpec): Interfaces.FlagInput<Record<string, string | boolean | undefined>> {
  return Object.fromEntries(
    Object.entries(spec.flags).map(([name, f]) => [
      name,
      f.type === 'boolean'
        ? Flags.boolean({ description: f.description, exclusive: f.exclusive })
        : Flags.string({ description: f.description, options: f.options, default: f.default, exclusive: f.exclusive }),
    ]),
  ) as Interfaces.FlagInput<Record<string, string | boolean | undefined>>
}

/** --cache-dir and --cache-max, for the oclif-only commands that read an image (info, verify, restore). */
export function cacheFlags(): Interfaces.FlagInput<Record<string, string | boolean | undefined>> {
  return oclifFlags({ description: '', examples: [], image: '', flags: CACHE_FLAGS })
}
