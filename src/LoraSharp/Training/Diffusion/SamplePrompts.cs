using System.Globalization;
using System.Text.RegularExpressions;

namespace LoraSharp.Training.Diffusion;

/// <summary>One sample-image request of a kohya prompt file.</summary>
public sealed record SamplePrompt(string Prompt, string NegativePrompt, int Width, int Height, int Steps, double CfgScale, long? Seed, string? Sampler, int Line);

/// <summary>
/// kohya's sample prompt file (.txt): one prompt per line, options after " --": <c>--n</c> negative prompt, <c>--w</c>/<c>--h</c>
/// size (rounded down to a multiple of 8, at least 64), <c>--s</c> steps (1..1000), <c>--l</c> CFG scale, <c>--d</c> seed,
/// <c>--ss</c> sampler. Empty lines and lines starting with <c>#</c> are skipped. Defaults: 512×512, 30 steps, CFG 7.5.
/// </summary>
public static partial class SamplePromptFile
{
    [GeneratedRegex(@"^(n|w|h|s|l|d|ss|cn|g)\s+(.+)$", RegexOptions.CultureInvariant | RegexOptions.Singleline)]
    private static partial Regex Arg();

    public static List<SamplePrompt> Read(string path)
    {
        if (!File.Exists(path)) throw new LoraSharpException("sample prompt file not found", path, "sample_prompts");
        return Parse(File.ReadAllLines(path), path);
    }

    public static List<SamplePrompt> Parse(IEnumerable<string> lines, string source = "prompts")
    {
        var list = new List<SamplePrompt>();
        int lineNo = 0;
        foreach (var raw in lines)
        {
            lineNo++;
            var line = raw.Trim();
            if (line.Length == 0 || line.StartsWith('#')) continue;
            var parts = (" " + line).Split(" --");
            string prompt = parts[0].Trim();
            string negative = "";
            int w = 512, h = 512, steps = 30;
            double cfg = 7.5;
            long? seed = null;
            string? sampler = null;
            foreach (var part in parts.Skip(1))
            {
                var m = Arg().Match(part.Trim());
                if (!m.Success) throw new LoraSharpException($"line {lineNo}: unknown prompt option '--{part.Trim()}' (expected --n, --w, --h, --s, --l, --d, --ss)", source);
                string v = m.Groups[2].Value.Trim();
                try
                {
                    switch (m.Groups[1].Value)
                    {
                        case "n": negative = v; break;
                        case "w": w = Math.Max(64, ParseInt(v) / 8 * 8); break;
                        case "h": h = Math.Max(64, ParseInt(v) / 8 * 8); break;
                        case "s": steps = Math.Clamp(ParseInt(v), 1, 1000); break;
                        case "l": cfg = double.Parse(v, NumberStyles.Float, CultureInfo.InvariantCulture); break;
                        case "d": seed = long.Parse(v, NumberStyles.Integer, CultureInfo.InvariantCulture); break;
                        case "ss": sampler = v; break;
                        default: break; // --cn (ControlNet image) and --g (Flux guidance) do not apply here
                    }
                }
                catch (FormatException)
                {
                    throw new LoraSharpException($"line {lineNo}: option --{m.Groups[1].Value} expects a number, got '{v}'", source);
                }
            }
            list.Add(new SamplePrompt(prompt, negative, w, h, steps, cfg, seed, sampler, lineNo));
        }
        return list;
    }

    /// <summary>
    /// The txt2img sampler for a kohya sampler name (<c>sample_sampler</c>, <c>--ss</c>): kohya's <c>k_euler</c>,
    /// <c>k_euler_a</c> and <c>dpmsolver++</c> (diffusers' DPMSolverMultistep = DPM++ 2M) map to the project's samplers;
    /// other names go to <see cref="Diffusion.Samplers.Create"/> as they are (ddim, euler, euler_a, dpmpp_2m, dpmpp_2m_karras, A1111 names).
    /// </summary>
    public static string SamplerName(string kohyaName) => kohyaName.Trim().ToLowerInvariant() switch
    {
        "k_euler" => "euler",
        "k_euler_a" => "euler_a",
        "dpmsolver++" => "dpmpp_2m",
        _ => kohyaName,
    };

    static int ParseInt(string v) => int.Parse(v, NumberStyles.Integer, CultureInfo.InvariantCulture);
}
