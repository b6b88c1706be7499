namespace LoraSharp;

/// <summary>
/// A user-facing error: a file, key or option that LoraSharp cannot accept. The message names the file (when
/// there is one), the key (when there is one) and what was expected, so a command can print it as one line.
/// </summary>
public class LoraSharpException : Exception
{
    /// <summary>The file the problem is in, when there is one.</summary>
    public string? FilePath { get; }

    /// <summary>The tensor or metadata key the problem is about, when there is one.</summary>
    public string? Key { get; }

    /// <summary>The problem alone, without the file and key prefix.</summary>
    public string Problem { get; }

    public LoraSharpException(string problem, string? filePath = null, string? key = null, Exception? inner = null)
        : base(Format(problem, filePath, key), inner)
    {
        Problem = problem;
        FilePath = filePath;
        Key = key;
    }

    static string Format(string problem, string? filePath, string? key)
    {
        var where = (filePath, key) switch
        {
            (not null, not null) => $"{filePath}: key '{key}': ",
            (not null, null) => $"{filePath}: ",
            (null, not null) => $"key '{key}': ",
            _ => "",
        };
        return where + problem;
    }
}
