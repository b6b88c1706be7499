namespace LoraSharp.Diffusion;

/// <summary>Creates samplers by A1111 display name or a short id.</summary>
public static class Samplers
{
    /// <summary>The A1111 display names supported.</summary>
    public static IReadOnlyList<string> Names { get; } = ["Euler", "Euler a", "DDIM", "DPM++ 2M", "DPM++ 2M Karras"];

    /// <summary>
    /// "Euler" / "euler", "Euler a" / "euler_a", "DDIM" / "ddim", "DPM++ 2M" / "dpmpp_2m",
    /// "DPM++ 2M Karras" / "dpmpp_2m_karras" (case-insensitive).
    /// </summary>
    public static ISampler Create(string name, int steps, ScheduleConfig? config = null)
    {
        var key = name.Trim().ToLowerInvariant().Replace("++", "pp").Replace(' ', '_');
        return key switch
        {
            "euler" => new EulerSampler(steps, config),
            "euler_a" or "euler_ancestral" => new EulerSampler(steps, config, ancestral: true),
            "ddim" => new DdimSampler(steps, config),
            "dpmpp_2m" => new DpmSolverMultistepSampler(steps, config),
            "dpmpp_2m_karras" => new DpmSolverMultistepSampler(steps, config, karras: true),
            _ => throw new LoraSharpException($"unknown sampler '{name}' (expected one of: {string.Join(", ", Names)})", key: "sampler"),
        };
    }
}
