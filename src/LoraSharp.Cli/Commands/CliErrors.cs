namespace LoraSharp.Cli.Commands;

/// <summary>Turns user-facing errors into one line on stderr and exit code 2.</summary>
public static class CliErrors
{
    public static int Run(Func<int> action)
    {
        try
        {
            return action();
        }
        catch (LoraSharpException e)
        {
            Console.Error.WriteLine("error: " + e.Message);
            return 2;
        }
    }
}
