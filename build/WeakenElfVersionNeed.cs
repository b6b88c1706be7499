// MSBuild task (compiled by RoslynCodeTaskFactory against netstandard, so plain C#): copies an ELF64
// little-endian shared library and sets VER_FLG_WEAK on the named version need in .gnu.version_r.
// Idempotent; skips the copy when the destination is up to date (same timestamp as the source).
using System;
using System.IO;
using System.Text;
using Microsoft.Build.Framework;
using Microsoft.Build.Utilities;

public class WeakenElfVersionNeed : Task
{
    [Required] public string Source { get; set; }
    [Required] public string Destination { get; set; }
    [Required] public string Version { get; set; }

    public override bool Execute()
    {
        try
        {
            if (File.Exists(Destination) && File.GetLastWriteTimeUtc(Destination) == File.GetLastWriteTimeUtc(Source))
                return true;
            byte[] elf = File.ReadAllBytes(Source);
            int changed = Weaken(elf, Version);
            Directory.CreateDirectory(Path.GetDirectoryName(Destination));
            string temp = Destination + ".tmp";
            File.WriteAllBytes(temp, elf);
            File.SetLastWriteTimeUtc(temp, File.GetLastWriteTimeUtc(Source));
            if (File.Exists(Destination)) File.Delete(Destination);
            File.Move(temp, Destination);
            Log.LogMessage(MessageImportance.Normal, "Patched " + Destination + ": " + Version + " made weak (" + changed + " entries).");
            return true;
        }
        catch (Exception e)
        {
            Log.LogError("Could not patch " + Source + ": " + e.Message);
            return false;
        }
    }

    static int Weaken(byte[] elf, string version)
    {
        if (elf.Length < 64 || elf[0] != 0x7f || elf[1] != (byte)'E' || elf[2] != (byte)'L' || elf[3] != (byte)'F')
            throw new InvalidDataException("not an ELF file");
        if (elf[4] != 2 || elf[5] != 1) throw new InvalidDataException("not a 64-bit little-endian ELF file");
        long shoff = (long)BitConverter.ToUInt64(elf, 0x28);
        int shentsize = BitConverter.ToUInt16(elf, 0x3A);
        int shnum = BitConverter.ToUInt16(elf, 0x3C);
        const uint ShtGnuVerneed = 0x6ffffffe;
        int changed = 0;
        for (int i = 0; i < shnum; i++)
        {
            long sh = shoff + (long)i * shentsize;
            if (BitConverter.ToUInt32(elf, (int)sh + 4) != ShtGnuVerneed) continue;
            long offset = (long)BitConverter.ToUInt64(elf, (int)sh + 0x18);
            int link = (int)BitConverter.ToUInt32(elf, (int)sh + 0x28);
            int count = (int)BitConverter.ToUInt32(elf, (int)sh + 0x2C);
            long strtab = (long)BitConverter.ToUInt64(elf, (int)(shoff + (long)link * shentsize) + 0x18);
            long need = offset;
            for (int n = 0; n < count; n++)
            {
                int auxCount = BitConverter.ToUInt16(elf, (int)need + 2);
                long aux = need + BitConverter.ToUInt32(elf, (int)need + 8);
                for (int a = 0; a < auxCount; a++)
                {
                    long name = strtab + BitConverter.ToUInt32(elf, (int)aux + 8);
                    if (ReadString(elf, name) == version)
                    {
                        ushort flags = BitConverter.ToUInt16(elf, (int)aux + 4);
                        flags |= 0x2; // VER_FLG_WEAK
                        elf[aux + 4] = (byte)(flags & 0xff);
                        elf[aux + 5] = (byte)(flags >> 8);
                        changed++;
                    }
                    aux += BitConverter.ToUInt32(elf, (int)aux + 12);
                }
                uint next = BitConverter.ToUInt32(elf, (int)need + 12);
                if (next == 0) break;
                need += next;
            }
        }
        return changed;
    }

    static string ReadString(byte[] data, long start)
    {
        long end = start;
        while (end < data.Length && data[end] != 0) end++;
        return Encoding.ASCII.GetString(data, (int)start, (int)(end - start));
    }
}
