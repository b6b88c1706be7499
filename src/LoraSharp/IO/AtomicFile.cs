using System.Text;

namespace LoraSharp.IO;

/// <summary>Small text outputs written atomically: a temp file in the same folder, flushed, then renamed over the target.</summary>
public static class AtomicFile
{
    public static void WriteAllText(string path, string contents)
    {
        var full = Path.GetFullPath(path);
        var temp = Path.Combine(Path.GetDirectoryName(full)!, $".{Path.GetFileName(full)}.{Guid.NewGuid():N}.tmp");
        try
        {
            using (var fs = new FileStream(temp, FileMode.CreateNew, FileAccess.Write))
            {
                fs.Write(new UTF8Encoding(false).GetBytes(contents));
                fs.Flush(flushToDisk: true);
            }
            File.Move(temp, full, overwrite: true);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            try { File.Delete(temp); } catch (IOException) { }
            throw new LoraSharpException($"cannot write file: {e.Message}", path, inner: e);
        }
    }
}
