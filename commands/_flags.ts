// oclif flags from the plain specs in commands/_spec.ts (the `_` prefix keeps oclif from
// taking this file for a command; see "commandDiscovery" in package.json).
import { Flags, type Interfaces } from '@oclif/core'
import { CACHE_FLAGS, type CommandSpec } from './_spec.js'

// Typed loosely on purpose: the values are checked by the shared action code (commands/_actions.ts).
export function oclifFlags(spec: CommandSpec): Interfaces.FlagInput<Record<string, string | boolean | number | undefined>> {
  return Object.fromEntries(
    Object.entries(spec.flags).map(([name, f]) => {
      const common = { description: f.description, exclusive: f.exclusive, dependsOn: f.dependsOn, required: f.required }
      if (f.type === 'boolean') return [name, Flags.boolean({ ...common, char: f.char as Interfaces.AlphabetLowercase | undefined })]
      if (f.type === 'integer') return [name, Flags.integer({ ...common, min: f.min, max: f.max })]
      return [name, Flags.string({ ...common, options: f.options, default: f.default })]
    }),
  ) as Interfaces.FlagInput<Record<string, string | boolean | number | undefined>>
}

/** --cache-dir and --cache-max, for the oclif-only commands that read an image (info, verify). */
export function cacheFlags(): Interfaces.FlagInput<Record<string, string | boolean | number | undefined>> {
  return oclifFlags({ description: '', examples: [], image: '', flags: CACHE_FLAGS })
}
